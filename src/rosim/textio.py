"""Reading user text files and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rosim.errors import DataError, InputError
from rosim.limits import text_problem


def iter_lines(path: str | os.PathLike, *, skip_empty: bool = True) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` from a UTF-8 file, streaming; non-UTF-8 bytes name the line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, expected a text file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            line = line.rstrip("\r\n").lstrip("\ufeff") if number == 1 else line.rstrip("\r\n")
            if skip_empty and (not line.strip() or text_problem(line) is not None):
                continue  # empty, or nothing visible (control / zero-width characters only)
            yield number, line


def read_lines(path: str | os.PathLike, *, what: str = "texts") -> list[str]:
    """All non-empty lines of a UTF-8 file; an empty file is an error."""
    lines = [line for _, line in iter_lines(path)]
    if not lines:
        raise InputError(f"{path} contains no {what}")
    return lines


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def output_path(path: str | os.PathLike) -> Path:
    """Where an output for ``path`` may be written: a regular file or a new name.

    A symlink to a regular file is written through (its target is replaced, the link stays); a
    device, pipe, directory or a link to one is refused, so ``-o /dev/null`` never replaces the
    device; a parent that is a file is named.
    """
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        if target.exists() and not target.is_file():
            raise InputError(f"{path} links to {target}, which is not a regular file: refusing to replace it; "
                             "write to a regular file")
        path = target
    elif path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device or pipe)"
        raise InputError(f"{path} is {kind}: refusing to replace it; write to a regular file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write {path}: {parent} is a file, not a directory")
            break
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Open a temporary sibling of ``path``; rename it over ``path`` only if the block succeeds.

    The target is checked by :func:`output_path`; the file gets the permissions a plain ``open``
    would give (0666 minus the umask), not ``mkstemp``'s 0600.
    """
    path = output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}) | kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
