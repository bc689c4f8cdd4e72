"""Generation (``/similar``) in its own process, so that sampling never holds this process's
interpreter lock while ``/encode`` runs here.

:class:`GenerationProcess` starts a child with the ``spawn`` context; the child loads the model itself
(``load()``, e.g. the same checkpoint directory) on ``threads`` torch threads and answers one call at
a time over a pipe. A call whose requests have all gone is stopped inside the model: the child checks
a shared cancel flag before every forward pass and every decoding step, through a forward pre-hook
on the model's embeddings (which both run). A child that dies is started again; the calls it had
(and any made before it is ready) fail at once with :class:`GenerationUnavailable` (503 + Retry-After). ``close()`` stops the child;
it also exits by itself when this process goes away.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

from rosim.server.batching import CallCancelled, QueueFull

log = logging.getLogger("rosim.server")
CHILD_NICENESS = 5  # added to the generation process' niceness (lower CPU priority than the server)


class GenerationUnavailable(QueueFull):
    """The generation process is starting, restarting or has failed: 503 + Retry-After."""

    code = "generation_unavailable"


def load_sim_model(directory: str | None):
    """``SimModel.load(directory)`` (None: the embedded model): a loader that pickles by reference."""
    from rosim.inference.sim_model import SimModel

    return SimModel.load(directory)


def model_loader(directory: str | os.PathLike | None) -> Callable:
    """The loader of :class:`GenerationProcess` for a checkpoint directory (None: the embedded model)."""
    return functools.partial(load_sim_model, None if directory is None else str(directory))


class GenerationProcess:
    """``similar(texts, cancel=event, **options)`` as :meth:`SimModel.similar`, computed in a child process.

    ``load``: a picklable callable returning the model (a SimModel) in the child; ``threads``: its torch
    threads; ``cancel_grace_s``: how long a cancelled call may take to stop before the child is killed
    (and restarted); ``start_timeout_s``: how long the child may take to load its model.
    """

    def __init__(self, load: Callable, *, threads: int = 1, cancel_grace_s: float = 10.0,
                 start_timeout_s: float = 600.0):
        if threads <= 0:
            raise ValueError(f"threads must be positive, got {threads}")
        self.load, self.threads = load, threads
        self.cancel_grace_s, self.start_timeout_s = cancel_grace_s, start_timeout_s
        self._ctx = mp.get_context("spawn")
        self._cancel = self._ctx.RawValue("q", 0)  # the id of the call the child is to stop
        self._ids = itertools.count(1)
        self._call_lock = threading.Lock()  # one call at a time
        self._lock = threading.Lock()  # the child, its pipe and status
        self._proc = None
        self._conn = None
        self._status = "stopped"  # starting | ready | restarting | failed | stopped
        self._failure = ""
        self._closing = False
        self._stuck: set[int] = set()  # pids killed for not stopping a cancelled call
        # calls answered, calls stopped early (cancelled), unexpected deaths, children started again
        self.counters = {"calls": 0, "cancelled": 0, "crashes": 0, "restarts": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the child (once; it loads its model in the background)."""
        with self._lock:
            if self._proc is not None or self._closing:
                return
            self._spawn_locked("starting")

    def _spawn_locked(self, status: str) -> None:
        parent_end, child_end = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_main, name="rosim-generation", daemon=True,
                                 args=(child_end, self.load, self.threads, self._cancel, os.getpid()))
        proc.start()
        child_end.close()
        self._proc, self._conn, self._status = proc, parent_end, status
        threading.Thread(target=self._watch, args=(proc, parent_end), name="rosim-generation-watch",
                         daemon=True).start()

    def _watch(self, proc, conn) -> None:
        """Wait for the child's "ready", then for its end: a child that dies unasked is started again."""
        ready = wait([conn, proc.sentinel], self.start_timeout_s)
        message = None
        if conn in ready:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                pass
        if message is None and proc.sentinel in ready:
            proc.join(1)  # its exit code
        with self._lock:
            if self._proc is not proc or self._closing:
                return
            if message is not None and message[0] == "ready":
                self._status = "ready"
            else:
                self._status = "failed"
                self._failure = message[2] if message is not None else (
                    f"exit code {proc.exitcode}" if proc.exitcode is not None else "it did not load its model in time")
                log.error("the generation process could not start: %s", self._failure)
                proc.kill()
                return
        proc.join()
        with self._lock:
            if self._proc is not proc or self._closing:
                return
            if proc.pid in self._stuck:
                self._stuck.discard(proc.pid)
            else:
                self.counters["crashes"] += 1
                log.error("the generation process stopped (exit code %s); starting it again", proc.exitcode)
            self._spawn_locked("restarting")
            self.counters["restarts"] += 1

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child (and never start it again)."""
        with self._lock:
            self._closing = True
            proc, conn, self._status = self._proc, self._conn, "stopped"
        if proc is None:
            return
        self._cancel.value = -1  # stop what it is doing (no call has id -1: every call checks its own id)
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the child has loaded its model (True) or could not (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._status in ("starting", "restarting"):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return self._status == "ready"

    @property
    def failure(self) -> str:
        """Why the child could not start ("" when it did)."""
        return self._failure

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def unavailable(self) -> GenerationUnavailable | None:
        """The 503 for a call now, or None when the child is ready."""
        status = self._status
        if status == "ready":
            return None
        why = {"starting": "is loading its model", "restarting": "is restarting after a crash",
               "failed": f"could not start ({self._failure})", "stopped": "is stopped"}[status]
        return GenerationUnavailable(f"similar: the generation process {why}; retry later", retry_after_s=2.0)

    def health(self) -> dict:
        return {"status": self._status, "pid": self.pid, "threads": self.threads, **self.counters}

    # ------------------------------------------------------------------ calls
    def similar(self, texts: list[str], cancel: threading.Event | None = None, **options):
        """:meth:`SimModel.similar` in the child; :class:`CallCancelled` when ``cancel`` was set first."""
        with self._call_lock:
            with self._lock:
                down = self.unavailable()
                proc, conn = self._proc, self._conn
            if down is not None:
                raise down
            call = next(self._ids)
            try:
                conn.send(("similar", call, list(texts), options))
            except (OSError, ValueError):
                raise self._lost(proc) from None
            asked_to_stop: float | None = None
            while True:
                watching = cancel is not None and asked_to_stop is None
                ready = wait([conn, proc.sentinel], 0.05 if watching or asked_to_stop is not None else None)
                if conn in ready:
                    try:
                        kind, answered, payload = conn.recv()
                    except (EOFError, OSError):
                        raise self._lost(proc) from None
                    if answered != call:
                        continue
                    if kind == "ok":
                        self.counters["calls"] += 1
                        return payload
                    if kind == "cancelled":
                        self.counters["cancelled"] += 1
                        raise CallCancelled(f"similar: stopped after {payload} forward passes: every request "
                                            "of the call had gone")
                    raise payload
                if proc.sentinel in ready:
                    raise self._lost(proc)
                if watching and cancel.is_set():
                    self._cancel.value = call
                    asked_to_stop = time.monotonic()
                elif asked_to_stop is not None and time.monotonic() - asked_to_stop > self.cancel_grace_s:
                    log.error("the generation process did not stop a cancelled call within %g s: killing it",
                              self.cancel_grace_s)
                    self._stuck.add(proc.pid)
                    proc.kill()  # the watcher starts another

    def _lost(self, proc) -> GenerationUnavailable:
        proc.join(1)
        return GenerationUnavailable(f"similar: the generation process stopped during this call (exit code "
                                     f"{proc.exitcode}); it is restarting, retry later", retry_after_s=2.0)


# ---------------------------------------------------------------------- the child
class _Stop(BaseException):
    """Raised inside the model's forward pass: the call in progress is to stop (a BaseException, so
    that no ``except Exception`` on the way out of the model holds it)."""


def _child_main(conn, load: Callable, threads: int, cancel, parent_pid: int) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops this child
    try:  # when cores are short, the server's event loop and encoding go first: they answer in milliseconds
        os.nice(CHILD_NICENESS)
    except OSError:
        pass

    torch.set_num_threads(threads)
    try:
        model = load()
    except BaseException as exc:  # reported to the parent, which answers 503 with it
        conn.send(("failed", 0, f"{type(exc).__name__}: {exc}"))
        return
    current = {"call": 0, "passes": 0}

    def check(module, args):
        current["passes"] += 1
        if cancel.value in (current["call"], -1) or os.getppid() != parent_pid:
            raise _Stop

    module = _per_step_module(getattr(model, "model", None))
    if module is not None:
        module.register_forward_pre_hook(check)
    try:
        conn.send(("ready", 0, None))
    except (OSError, ValueError):  # closed while loading
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent has gone
            return
        if message is None:
            return
        _, call, texts, options = message
        current.update(call=call, passes=0)
        try:
            reply = ("ok", call, model.similar(texts, **options))
        except _Stop:
            if cancel.value == -1 or os.getppid() != parent_pid:
                return
            reply = ("cancelled", call, current["passes"])
        except Exception as exc:
            reply = ("error", call, _picklable(exc))
        current["call"] = 0
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


def _per_step_module(model):
    """The submodule called once per forward pass and once per decoding step: the embeddings (the
    cached decoder calls ``decode_step``, not ``forward``, so a hook on the model itself would not see
    the steps); the model itself when it has none."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return None
    embeddings = getattr(model, "embeddings", None)
    return embeddings if isinstance(embeddings, torch.nn.Module) else model


def _picklable(exc: Exception) -> Exception:
    """``exc`` with the child's traceback as a note (the parent logs it), or a RuntimeError saying what
    it was when it does not pickle."""
    import pickle
    import traceback

    exc.add_note("in the generation process:\n" + "".join(traceback.format_tb(exc.__traceback__)).rstrip())
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
