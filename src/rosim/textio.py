"""Reading user text files and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rosim.errors import DataError, InputError


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
            if skip_empty and not line.strip():
                continue
            yield number, line


def read_lines(path: str | os.PathLike, *, what: str = "texts") -> list[str]:
    """All non-empty lines of a UTF-8 file; an empty file is an error."""
    lines = [line for _, line in iter_lines(path)]
    if not lines:
        raise InputError(f"{path} contains no {what}")
    return lines


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Open a temporary sibling of ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}) | kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
