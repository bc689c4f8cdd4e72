"""Admission control: the bounded queue in front of each kind of model call.

Three :class:`~rosim.server.batching.MicroBatcher` queues: ``encode`` (``/encode``, ``/similarity``),
``similar`` (``/similar``) and ``search`` (``/search``). Generation has its own thread, or its own
process (:class:`~rosim.server.generation.GenerationProcess`), so that vectors are never queued behind
seconds of sampling; encoding and search share one model thread. Each queue is bounded by requests
and by estimated wait (503 + Retry-After beyond either, before the body is parsed); a request that
waits longer than ``request_timeout_s`` is answered 504.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rosim.server.batching import MicroBatcher, QueueFull
from rosim.server.errors import ApiError
from rosim.server.model_calls import ModelCalls
from rosim.server.schemas import Limits


class ModelQueues:
    """The queues of one app: ``run(queue, key, items)`` waits for a result or raises 503 / 504."""

    def __init__(self, calls: ModelCalls, limits: Limits, *, max_batch: int, max_batch_rows: int,
                 max_wait_ms: float, batching: bool, search: bool):
        generation = calls.generation
        short_calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rosim-encode")
        generating = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rosim-generate")
        common = dict(max_wait_ms=max_wait_ms, enabled=batching, max_queue=limits.max_queue,
                      max_queue_s=limits.max_queue_s)
        self.encode = MicroBatcher(calls.encode, short_calls, max_batch=max_batch, name="encode", **common)
        self.similar = MicroBatcher(calls.similar, generating, max_batch=max_batch_rows, name="similar",
                                    cancellable=generation is not None,
                                    unavailable=None if generation is None else generation.unavailable, **common)
        self.search = MicroBatcher(calls.search, short_calls, max_batch=max_batch, name="search", **common)
        self.timeout_s = limits.request_timeout_s
        self._by_path = {"/encode": self.encode, "/similarity": self.encode, "/similar": self.similar}
        if search:
            self._by_path["/search"] = self.search
        self.settings = {"enabled": batching, "max_batch": max_batch, "max_batch_rows": max_batch_rows,
                         "max_wait_ms": max_wait_ms}

    @property
    def all(self) -> dict[str, MicroBatcher]:
        return {"encode": self.encode, "similar": self.similar, "search": self.search}

    async def run(self, queue: MicroBatcher, key: Hashable, items: list, cost: int | None = None) -> list[Any]:
        try:
            return await asyncio.wait_for(queue.submit(key, items, cost), self.timeout_s)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no result within {self.timeout_s:g} s; the server is "
                           "overloaded or the request is too large") from None

    def refusal(self, path: str) -> QueueFull | None:
        """The 503 a new request to ``path`` would get now (None: admitted, or no queue behind it)."""
        queue = self._by_path.get(path)
        return None if queue is None else queue.refusal()

    def health(self) -> dict:
        return {**self.settings, **{name: {**q.stats.as_dict(), "queued": q.queued} for name, q in self.all.items()}}

    async def aclose(self) -> None:
        for queue in self.all.values():
            await queue.aclose()
