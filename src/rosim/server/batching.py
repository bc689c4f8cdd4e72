"""Micro-batching: concurrent requests are queued and merged into one model call.

A request becomes a *job*: a key (what kind of call, with which options), a list of items (texts)
and a cost (texts for encoding, generated rows for generation). One worker task per batcher takes
the oldest waiting job, waits until its jobs of the same key add up to ``max_batch`` or the oldest
has waited ``max_wait_ms``, then runs them as one call on a single model thread, and hands every
job back its own slice of the results. Jobs that queued while the model was busy go out at once.

With ``enabled=False`` every job is its own call (the same thread, the same queue): the baseline
that ``benchmarks/serve.py`` compares against.

Admission control: a job is refused at once (:class:`QueueFull`, answered 503 + Retry-After) when
``max_queue`` jobs already wait, or when the rest of the call in progress, the work queued ahead of
it and its own would take longer than ``max_queue_s`` at the speed measured on recent calls
(seconds per unit of cost, a moving average; an idle batcher accepts any job); before the first
call has been measured, at most one call's worth of cost may wait. A job whose
caller has gone (its future cancelled: a client that disconnected, or a request past its deadline)
is dropped before it reaches the model. ``unavailable()``, when given, refuses every job while the
model cannot take any (generation restarting after a crash).

With ``cancellable=True`` the run function gets a third argument, a :class:`threading.Event` set
when every job of the call in progress has lost its caller: a run that can stop early (generation
in its own process) then raises :class:`CallCancelled`.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

RunFn = Callable[[Hashable, list[Any]], Sequence[Any]]


class QueueFull(Exception):
    """More work is waiting than the batcher accepts; the server answers 503 with ``Retry-After``."""

    code = "busy"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CallCancelled(Exception):
    """A model call stopped before its end because every request in it had gone."""


@dataclass
class _Job:
    key: Hashable
    items: list[Any]
    cost: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters for /health and the tests: how many requests became how many model calls."""

    requests: int = 0
    calls: int = 0
    items: int = 0
    largest_call: int = 0  # jobs merged into the largest call
    rejected: int = 0  # refused at once because the queue was full (503)
    dropped: int = 0  # left the queue unanswered: the client disconnected or the deadline passed
    busy_s: float = 0.0  # wall time spent inside model calls

    def as_dict(self) -> dict[str, int | float]:
        return dict(requests=self.requests, model_calls=self.calls, items=self.items,
                    largest_call=self.largest_call, rejected=self.rejected, dropped=self.dropped,
                    model_seconds=round(self.busy_s, 3))


class MicroBatcher:
    """Queue jobs and run them in merged calls of ``run(key, items) -> results`` (one result per item).

    ``run`` executes on ``executor`` (share a one-thread executor between batchers so that model
    calls never overlap). If a merged call raises, each of its jobs is retried alone so that one bad
    request cannot fail its neighbours.
    """

    def __init__(self, run: RunFn, executor: Executor, *, max_batch: int = 64, max_wait_ms: float = 5.0,
                 enabled: bool = True, max_queue: int = 256, max_queue_s: float | None = None,
                 name: str = "batcher", cancellable: bool = False,
                 unavailable: Callable[[], QueueFull | None] | None = None):
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue <= 0 or (max_queue_s is not None and not max_queue_s > 0):
            raise ValueError(f"max_queue and max_queue_s must be positive, got {max_queue} and {max_queue_s}")
        self.run, self.executor, self.name = run, executor, name
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.enabled, self.max_queue, self.max_queue_s = enabled, max_queue, max_queue_s
        self.cancellable, self.unavailable = cancellable, unavailable
        self.stats = BatchStats()
        self.seconds_per_cost: float | None = None  # moving average over model calls
        self._running_until = 0.0  # monotonic time the call in progress is expected to end
        self._busy = False  # a model call is in progress
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._pending: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None

    # ------------------------------------------------------------------ public
    async def submit(self, key: Hashable, items: list[Any], cost: int | None = None) -> list[Any]:
        """Queue ``items`` under ``key`` and wait for their results (in order)."""
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        cost = max(1, len(items) if cost is None else cost)
        self._admit(cost)
        job = _Job(key, list(items), cost, loop.create_future())
        self._pending.append(job)
        self.stats.requests += 1
        self._wakeup.set()
        return await job.future  # cancelling the caller cancels the future: the worker then skips the job

    @property
    def queued(self) -> int:
        """Jobs waiting for the model (not counting the call in progress)."""
        return sum(1 for j in self._pending if not j.future.done())

    def queued_cost(self) -> int:
        return sum(j.cost for j in self._pending if not j.future.done())

    def estimated_wait(self, cost: int = 0) -> float | None:
        """Seconds until a new job of ``cost`` would be answered, at the measured speed (None before any)."""
        if self.seconds_per_cost is None:
            return None
        running = max(0.0, self._running_until - time.monotonic())
        return running + (self.queued_cost() + cost) * self.seconds_per_cost

    def refusal(self) -> QueueFull | None:
        """The 503 that any new job would get now (counted as rejected), or None: lets the server shed
        load before it parses a request."""
        try:
            self._admit(1)
        except QueueFull as exc:
            return exc
        return None

    def _admit(self, cost: int) -> None:
        down = self.unavailable() if self.unavailable is not None else None
        if down is not None:
            self.stats.rejected += 1
            raise down
        waiting = sum(1 for j in self._pending if not j.future.done())
        if waiting >= self.max_queue:
            self._reject(f"{waiting} requests are already waiting for the model", 1.0)
        if self.max_queue_s is None:
            return
        wait = self.estimated_wait(cost)
        if wait is None:  # nothing measured yet: let at most two calls' worth of work wait
            if (waiting or self._busy) and self.queued_cost() + cost > max(self.max_batch, cost):
                self._reject(f"{waiting} requests are already waiting for the model", 1.0)
        elif wait > self.max_queue_s and (waiting or self._busy):  # idle: even a long job runs
            self._reject(f"the work already queued would take about {wait:.1f} s (the limit is "
                         f"{self.max_queue_s:g} s)", wait - self.max_queue_s)

    def _reject(self, why: str, retry_after_s: float) -> None:
        self.stats.rejected += 1
        raise QueueFull(f"{self.name}: {why}; retry later", retry_after_s=max(1.0, math.ceil(retry_after_s)))

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    # ------------------------------------------------------------------ worker
    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        # The worker belongs to the running loop; a new loop (a test client per request) gets a new one.
        if self._loop is not loop or self._task is None or self._task.done():
            if self._loop is not loop:
                self._pending = collections.deque(j for j in self._pending if not j.future.done()
                                                  and j.future.get_loop() is loop)
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._worker(), name=f"rosim-{self.name}")

    def _same_key_cost(self, key: Hashable) -> int:
        return sum(j.cost for j in self._pending if j.key == key and not j.future.done())

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._pending and self._pending[0].future.done():  # cancelled while queued
                self._pending.popleft()
                self.stats.dropped += 1
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = self._pending[0]
            if self.enabled:
                deadline = oldest.arrived + self.max_wait
                while self._same_key_cost(oldest.key) < self.max_batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            jobs = self._take(oldest.key)
            if jobs:
                self._busy = True
                try:
                    await self._run_jobs(loop, oldest.key, jobs)
                finally:
                    self._running_until, self._busy = 0.0, False

    def _take(self, key: Hashable) -> list[_Job]:
        """Remove and return the oldest live jobs of ``key``, up to ``max_batch`` cost (at least one)."""
        taken, cost, rest = [], 0, collections.deque()
        for job in self._pending:
            if job.future.done():
                self.stats.dropped += 1
                continue
            fits = not taken or (self.enabled and cost + job.cost <= self.max_batch)
            if job.key == key and fits:
                taken.append(job)
                cost += job.cost
            else:
                rest.append(job)
        self._pending = rest
        return taken

    def _timed(self, key: Hashable, items: list[Any], cost: int, cancel: threading.Event | None) -> Sequence[Any]:
        start = time.perf_counter()
        complete = False
        try:
            results = self.run(key, items) if cancel is None else self.run(key, items, cancel)
            complete = True
            return results
        finally:
            took = time.perf_counter() - start
            self.stats.busy_s += took
            if complete:  # a call that failed or was cut short says little of the speed
                rate = took / max(cost, 1)
                old = self.seconds_per_cost
                self.seconds_per_cost = rate if old is None else 0.7 * old + 0.3 * rate

    async def _run_jobs(self, loop: asyncio.AbstractEventLoop, key: Hashable, jobs: list[_Job]) -> None:
        flat = [item for job in jobs for item in job.items]
        cost = sum(job.cost for job in jobs)
        self.stats.calls += 1
        self.stats.items += len(flat)
        self.stats.largest_call = max(self.stats.largest_call, len(jobs))
        if self.seconds_per_cost is not None:
            self._running_until = time.monotonic() + cost * self.seconds_per_cost
        cancel = self._cancel_when_abandoned(jobs) if self.cancellable else None
        try:
            results = await loop.run_in_executor(self.executor, self._timed, key, flat, cost, cancel)
        except Exception as exc:
            if len(jobs) == 1 or isinstance(exc, QueueFull | CallCancelled):  # no use trying each job alone
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                return
            for job in jobs:  # isolate the failure: each job alone
                if not job.future.done():
                    await self._run_jobs(loop, key, [job])
            return
        if len(results) != len(flat):
            exc = RuntimeError(f"{self.name}: run returned {len(results)} results for {len(flat)} items")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        offset = 0
        for job in jobs:
            part = list(results[offset:offset + len(job.items)])
            offset += len(job.items)
            if not job.future.done():
                job.future.set_result(part)

    @staticmethod
    def _cancel_when_abandoned(jobs: list[_Job]) -> threading.Event:
        """An event set once every job's future has been cancelled (all their callers have gone)."""
        cancel = threading.Event()
        left = len(jobs)

        def gone(future: asyncio.Future) -> None:
            nonlocal left
            if future.cancelled():
                left -= 1
                if left == 0:
                    cancel.set()

        for job in jobs:
            job.future.add_done_callback(gone)
        return cancel
