"""The `rosim` command line: a thin layer over the Python API.

Each area registers its commands from its own module (``rosim.cli.<area>``). Errors raised by
rosim become one line on stderr: exit status 2 for bad input, 1 for other failures.
"""

from __future__ import annotations

import sys

import typer

from rosim.errors import InputError, RosimError

app = typer.Typer(
    name="rosim",
    help="RoFormer-Sim in PyTorch: retrieve and generate similar Chinese sentences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


_registered = False


def _register() -> None:
    """Import every area's commands once (main() may run many times in one process, e.g. in tests)."""
    global _registered
    if _registered:
        return
    _registered = True
    import importlib

    for area in ("model", "inference", "export", "retrieval", "closed_forms", "training", "univae", "server"):
        importlib.import_module(f"rosim.cli.{area}").register(app)


def _say(message: str) -> None:
    """One line on stderr, whatever it holds: bytes that were not UTF-8 in a file name or argument
    (surrogate escapes) are shown as ``\\xNN`` instead of failing to print."""
    line = " ".join(str(message).splitlines()) or "(no message)"
    typer.echo(line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), err=True)


def _usage_line(exc) -> str:
    """A click usage error as one line: what was wrong, and where the help is."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "rosim"
    return f"{message} (see '{command} --help')"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _say(f"rosim: warning: {message}")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _one_line_warning  # a warning is one line, as an error is
    _register()
    try:
        # with standalone_mode=False click *returns* the code of a typer.Exit instead of raising it
        result = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except InputError as exc:
        _say(f"rosim: error: {exc}")
        return 2
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError) as exc:
        _say(f"rosim: error: {exc}")
        return 2
    except RosimError as exc:
        _say(f"rosim: error: {exc}")
        return 1
    except KeyboardInterrupt:
        typer.echo("rosim: interrupted", err=True)
        return 130
    except Exception as exc:  # usage errors from click, or from the copy of click that typer >= 0.2x vendors
        import click

        if isinstance(exc, (click.exceptions.Abort, typer.Abort)) or type(exc).__name__ == "Abort":
            return 130
        if isinstance(exc, (click.exceptions.ClickException, typer.TyperException)) and hasattr(exc, "show"):
            _say(f"rosim: error: {_usage_line(exc)}")
            return 2
        raise
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0


if __name__ == "__main__":
    sys.exit(main())
