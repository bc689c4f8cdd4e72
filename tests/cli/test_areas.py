"""Every command area is part of rosim: one that fails to import is a bug to show, not an area to skip."""

import sys

import pytest
import typer

import rosim.cli as cli


def test_an_area_that_cannot_be_imported_is_not_skipped(monkeypatch):
    monkeypatch.setattr(cli, "app", typer.Typer())
    monkeypatch.setattr(cli, "_registered", False)
    monkeypatch.setitem(sys.modules, "rosim.cli.univae", None)  # importing it raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match="rosim.cli.univae"):
        cli._register()


def test_every_area_registers_its_commands(monkeypatch):
    app = typer.Typer()
    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(cli, "_registered", False)
    cli._register()
    names = set(typer.main.get_command(app).commands)
    assert {"convert", "similar", "sim", "encode", "search", "export", "index", "classify", "train", "corpus",
            "vae", "serve"} <= names
