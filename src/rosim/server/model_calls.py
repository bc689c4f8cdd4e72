"""What the queues run on the model: ``call(key, items) -> one result per item``, for merged requests."""

from __future__ import annotations

import threading

import numpy as np


class ModelCalls:
    """The model calls behind the endpoints. ``generation``, when given (a
    :class:`~rosim.server.generation.GenerationProcess`), runs ``/similar`` in its own process instead of
    on ``model``, and can stop a call that has started."""

    def __init__(self, model, index, encode_batch_size: int, generation=None):
        self.model, self.index, self.encode_batch_size, self.generation = model, index, encode_batch_size, generation

    def encode(self, key, texts: list[str]) -> list[np.ndarray]:
        unique = list(dict.fromkeys(texts))  # merged requests often share texts
        row: dict[str, np.ndarray] = {}
        limit = int(getattr(self.model, "max_length", 64))
        for chunk in length_buckets(unique, cap=self.encode_batch_size, max_tokens=limit):
            part = [unique[i] for i in chunk]
            vecs = self.model.encode(part, normalize=False, batch_size=self.encode_batch_size)
            row.update(zip(part, vecs, strict=True))
        return [row[t] for t in texts]

    def similar(self, key, texts: list[str], cancel: threading.Event | None = None) -> list[list[tuple[str, float]]]:
        """``cancel`` (set when every request of the call has gone) stops generation in its process."""
        _, n, top_p, max_new_tokens, seed = key
        options = dict(n=n, k=n, top_p=top_p, max_new_tokens=max_new_tokens, seed=None if seed is None else seed[0])
        if self.generation is not None:
            return self.generation.similar(texts, cancel=cancel, **options)
        return self.model.similar(texts, **options)

    def search(self, key, items: list[tuple[str, int]]) -> list[list[tuple[str, float]]]:
        k = max(kk for _, kk in items)
        found = self.index.search([t for t, _ in items], k)
        return [list(f)[:kk] for f, (_, kk) in zip(found, items, strict=True)]


def length_buckets(texts: list[str], *, cap: int = 32, waste: float = 1.3, max_tokens: int = 64) -> list[list[int]]:
    """Indices of ``texts`` in forward passes of similar length: sorted by length, a pass closes when
    it holds ``cap`` texts or padding to its longest text would cost more than ``waste`` times its
    real length. A merged batch of mixed lengths padded as one pass wastes more than batching saves
    on a CPU (``benchmarks/serve.py``). Characters stand in for tokens (one per CJK character); the
    model reads at most ``max_tokens`` of them, [CLS] and [SEP] included."""
    def size_of(i: int) -> int:
        return min(len(texts[i]) + 2, max_tokens)

    order = sorted(range(len(texts)), key=size_of)
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        size = size_of(i)
        if current and (len(current) >= cap or size * (len(current) + 1) > waste * (total + size)):
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        chunks.append(current)
    return chunks
