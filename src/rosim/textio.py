"""Reading user text files and writing outputs atomically.

Every output goes through :func:`atomic_write` (a file) or :func:`atomic_directory` (a directory):
written to a temporary sibling named after the target and this process
(``.NAME.PID-XXXX.tmp`` / ``.NAME.tmp-PID-XXXX``), then renamed into place, under
:func:`output_lock` so that two writers of one target take turns (or the second is refused). A
temporary sibling whose process is gone (killed with ``kill -9``) is removed by the next write of
the same target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
import threading
import time
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
        if (target.exists() or path.exists()) and not path.is_file():  # path.*: through the link (/dev/stdout)
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


# ---------------------------------------------------------------------- locks and litter
_lock_guard = threading.Lock()
_locks: dict[str, tuple[threading.RLock, list]] = {}  # lock file -> (thread lock, [fd, depth])


def _mkdir_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"cannot write {path}: a parent of it is a file, not a directory") from None


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, *, wait: bool = True):
    """Hold the write lock of ``target`` (an advisory ``flock`` on ``.NAME.lock`` beside it).

    ``wait=False`` refuses at once (InputError) when another process or thread holds it; the same
    thread may take it again (nested). The lock file is removed when the lock is released.
    """
    target = Path(target)
    _mkdir_parent(target)
    lock_path = target.parent.resolve() / f".{target.name}.lock"
    key = str(lock_path)
    with _lock_guard:
        rlock, state = _locks.setdefault(key, (threading.RLock(), [None, 0]))
    if not rlock.acquire(blocking=wait):
        raise InputError(f"{target} is being written by another rosim task; wait for it or choose another output")
    try:
        if state[1] == 0:
            state[0] = _flock(lock_path, target, wait)
        state[1] += 1
        try:
            yield
        finally:
            state[1] -= 1
            if state[1] == 0:
                fd, state[0] = state[0], None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)  # before unlocking: a waiter on this inode sees it is gone and retries
                os.close(fd)
    finally:
        rlock.release()


def _flock(lock_path: Path, target: Path, wait: bool) -> int:
    try:
        import fcntl
    except ImportError:  # not POSIX: the in-process lock only
        return os.open(os.devnull, os.O_RDONLY)
    while True:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{target} is being written by another rosim process; wait for it to finish or "
                             "choose another output") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder removed it after we opened it: take the new one


_OWNER = re.compile(r"(\d+)-")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale(target: str | os.PathLike, *, older_than_s: float = 3600.0) -> list[Path]:
    """Remove temporary siblings of ``target`` left by a writer that no longer runs (``kill -9``):
    ``.NAME.PID-*.tmp`` files and ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` directories whose PID is
    not alive, and ones without a PID (older rosim versions) once older than ``older_than_s``."""
    target = Path(target)
    prefix = f".{target.name}."
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix) or name == f".{target.name}.lock":
            continue
        rest = name[len(prefix):]
        if not (rest.endswith(".tmp") or rest.startswith(("tmp-", "old-"))):
            continue
        match = _OWNER.match(rest[4:] if rest.startswith(("tmp-", "old-")) else rest)
        try:
            if match:
                stale = not _alive(int(match.group(1)))
            else:
                stale = time.time() - entry.lstat().st_mtime > older_than_s
            if not stale:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yield a temporary sibling directory that replaces ``target`` when the block succeeds.

    Under :func:`output_lock`; an existing ``target`` is swapped out in one step where the system
    allows it (Linux), so that a reader always finds a whole old or a whole new directory.
    """
    target = Path(target)
    _mkdir_parent(target)
    with output_lock(target):
        clean_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; an output is as readable as any other directory
        try:
            yield tmp
            if target.exists() and not target.is_dir():
                raise InputError(f"{target} exists and is not a directory")
            if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
                return
            backup = None
            if target.exists():
                backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
                os.replace(target, backup)
            os.replace(tmp, target)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Open a temporary sibling of ``path``; rename it over ``path`` only if the block succeeds.

    The target is checked by :func:`output_path`; the file gets the permissions a plain ``open``
    would give (0666 minus the umask), not ``mkstemp``'s 0600. Stale temporary siblings of ``path``
    (from a killed run) are removed first.
    """
    path = output_path(path)
    _mkdir_parent(path)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}) | kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
