"""Writing outputs: never replace a device or directory, write through links, keep the umask."""

from __future__ import annotations

import os
import stat

import pytest

from rosim.errors import InputError
from rosim.textio import atomic_write


def test_devices_and_directories_are_refused(tmp_path):
    for target in ("/dev/null", tmp_path):
        with pytest.raises(InputError, match="refusing to replace"), atomic_write(target) as f:
            f.write("x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    link = tmp_path / "out.txt"
    link.symlink_to("/dev/null")
    with pytest.raises(InputError, match="links to /dev/null"), atomic_write(link) as f:
        f.write("x")
    assert link.is_symlink() and not list(tmp_path.glob(".*tmp"))


def test_a_link_to_a_regular_file_is_written_through(tmp_path):
    real = tmp_path / "data" / "real.txt"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with atomic_write(link) as f:
        f.write("new")
    assert link.is_symlink() and real.read_text() == "new"


def test_parent_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile is a file, not a directory"), \
            atomic_write(tmp_path / "afile" / "v.npy", "wb") as f:
        f.write(b"x")


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.txt") as f:
            f.write("x")
        os.umask(0o077)
        with atomic_write(tmp_path / "b.txt") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o600


def test_cli_encode_to_a_device_exits_2(tmp_path, capsys):
    from rosim.cli import main
    from tests.helpers import tiny_model

    model, tok = tiny_model()
    from rosim.inference.sim_model import SimModel

    SimModel(model, tok).save_pretrained(tmp_path / "m")
    (tmp_path / "in.txt").write_text("今天天气不错\n", encoding="utf-8")
    link = tmp_path / "v.npy"
    link.symlink_to("/dev/null")
    assert main(["encode", str(tmp_path / "in.txt"), "-o", str(link), "--model", str(tmp_path / "m")]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert link.is_symlink()
