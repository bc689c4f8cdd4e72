"""Fixtures for the server tests: a tiny random model, wrapped to count and slow down model calls."""

from __future__ import annotations

import threading
import time

import pytest

from rosim.inference.sim_model import SimModel
from tests.helpers import tiny_model


class InstrumentedModel:
    """A SimModel proxy that records each model call (and can make it slow)."""

    def __init__(self, model: SimModel, delay: float = 0.0):
        self.model, self.delay = model, delay
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def _record(self, name: str, size: int) -> None:
        with self._lock:
            self.calls.append((name, size))
        if self.delay:
            time.sleep(self.delay)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def encode(self, texts, **kw):
        self._record("encode", len(texts))
        return self.model.encode(texts, **kw)

    def similar(self, texts, **kw):
        self._record("similar", len(texts))
        return self.model.similar(texts, **kw)

    def identity(self) -> dict:
        return self.model.identity()

    @property
    def name(self) -> str:
        return self.model.name


def load_tiny(delay_s: float = 0.0) -> SimModel:
    """The ``sim`` fixture's model, as a generation process loads it (``delay_s``: every forward pass
    and every decoding step sleeps that long first; both run the embeddings)."""
    model, tok = tiny_model()
    sim = SimModel(model, tok, name="tiny-test")
    if delay_s:
        sim.model.embeddings.register_forward_pre_hook(lambda module, args: time.sleep(delay_s))
    return sim


class _Deaf:
    """A model whose generation never runs a forward pass, so it never sees a cancel: sleeps 60 s."""

    def similar(self, texts, **kw):
        time.sleep(60)


def load_deaf() -> _Deaf:
    return _Deaf()


@pytest.fixture(scope="session")
def sim() -> SimModel:
    model, tok = tiny_model()
    return SimModel(model, tok, name="tiny-test")


class ListIndex:
    """A brute-force index over a few sentences: the SearchIndex protocol of rosim.server."""

    def __init__(self, sim: SimModel, texts: list[str]):
        self.sim, self.texts = sim, list(texts)
        self.vecs = sim.encode(self.texts)
        self.calls = 0

    def __len__(self) -> int:
        return len(self.texts)

    def search(self, queries: list[str], k: int):
        self.calls += 1
        scores = self.sim.encode(queries) @ self.vecs.T
        out = []
        for row in scores:
            order = row.argsort()[::-1][:k]
            out.append([(self.texts[i], float(row[i])) for i in order])
        return out
