"""Micro-batching: concurrent requests become one model call, results go back to the right caller."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from rosim.server import MicroBatcher, QueueFull, create_app
from tests.server.conftest import InstrumentedModel


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=True)


class Recorder:
    def __init__(self, delay: float = 0.0, fail_on=None):
        self.calls: list[tuple[object, list]] = []
        self.delay, self.fail_on = delay, fail_on
        self.threads: set[str] = set()

    def __call__(self, key, items):
        self.calls.append((key, list(items)))
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [f"{key}:{x}" for x in items]


def test_concurrent_jobs_merge_into_one_call(executor):
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, executor, max_batch=100, max_wait_ms=50)
        results = await asyncio.gather(*(b.submit("k", [i, i + 100]) for i in range(10)))
        await b.aclose()
        return b, results

    b, results = asyncio.run(main())
    assert results == [[f"k:{i}", f"k:{i + 100}"] for i in range(10)]
    assert len(rec.calls) == 1 and len(rec.calls[0][1]) == 20
    stats = b.stats.as_dict()
    assert stats.pop("model_seconds") >= 0
    assert stats == dict(requests=10, model_calls=1, items=20, largest_call=10, rejected=0, dropped=0)


def test_batches_respect_max_batch_and_keys(executor):
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, executor, max_batch=4, max_wait_ms=20)
        jobs = [b.submit("a" if i % 2 else "b", [i]) for i in range(12)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert results == [[f"{'a' if i % 2 else 'b'}:{i}"] for i in range(12)]
    assert all(len(items) <= 4 for _, items in rec.calls)
    for key, items in rec.calls:  # one key per call
        assert all((i % 2 == 1) == (key == "a") for i in items)
    assert sorted(len(items) for _, items in rec.calls) == [2, 2, 4, 4]  # 6 per key, 4 at most per call


def test_a_job_larger_than_max_batch_still_runs_alone(executor):
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, executor, max_batch=2, max_wait_ms=5)
        return await asyncio.gather(b.submit("k", [1, 2, 3, 4, 5]), b.submit("k", [6]))

    assert asyncio.run(main()) == [[f"k:{i}" for i in range(1, 6)], ["k:6"]]
    assert [len(items) for _, items in rec.calls] == [5, 1]


def test_disabled_means_one_call_per_job(executor):
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, executor, max_batch=100, max_wait_ms=50, enabled=False)
        return await asyncio.gather(*(b.submit("k", [i]) for i in range(6)))

    assert asyncio.run(main()) == [[f"k:{i}"] for i in range(6)]
    assert len(rec.calls) == 6


def test_jobs_queued_during_a_call_go_out_together(executor):
    rec = Recorder(delay=0.15)

    async def main():
        b = MicroBatcher(rec, executor, max_batch=100, max_wait_ms=0)
        first = asyncio.ensure_future(b.submit("k", [0]))
        await asyncio.sleep(0.05)  # the first call is running now
        rest = await asyncio.gather(*(b.submit("k", [i]) for i in range(1, 8)))
        return [await first, *rest]

    assert asyncio.run(main()) == [[f"k:{i}"] for i in range(8)]
    assert [len(items) for _, items in rec.calls] == [1, 7]


def test_a_failing_job_does_not_fail_its_neighbours(executor):
    rec = Recorder(fail_on=3)

    async def main():
        b = MicroBatcher(rec, executor, max_batch=100, max_wait_ms=30)
        return await asyncio.gather(*(b.submit("k", [i]) for i in range(6)), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [[f"k:{i}"] for i in range(6) if i != 3]


def test_queue_bound_and_cancellation(executor):
    rec = Recorder(delay=0.2)

    async def main():
        b = MicroBatcher(rec, executor, max_batch=1, max_wait_ms=0, max_queue=2)
        running = asyncio.ensure_future(b.submit("k", [0]))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit("k", [i])) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit("k", [3])
        queued[0].cancel()  # a caller that gave up is skipped, not run
        results = await asyncio.gather(running, queued[1])
        return b, results

    b, results = asyncio.run(main())
    assert results == [["k:0"], ["k:2"]]
    assert [items for _, items in rec.calls] == [[0], [2]]
    assert b.stats.rejected == 1


def test_runs_on_the_given_executor_thread():
    rec = Recorder()
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-thread")

    async def main():
        b = MicroBatcher(rec, ex, max_batch=8, max_wait_ms=1)
        await asyncio.gather(*(b.submit("k", [i]) for i in range(20)))

    asyncio.run(main())
    ex.shutdown()
    assert len(rec.threads) == 1 and next(iter(rec.threads)).startswith("model-thread")


def test_length_buckets_group_similar_lengths():
    from rosim.server.app import length_buckets

    texts = ["一" * n for n in (3, 40, 4, 41, 5, 39, 3)]
    chunks = length_buckets(texts, cap=32)
    assert sorted(i for c in chunks for i in c) == list(range(7))
    assert [sorted(len(texts[i]) for i in c) for c in chunks] == [[3, 3, 4, 5], [39, 40, 41]]
    assert all(len(c) <= 2 for c in length_buckets(["同样长"] * 5, cap=2))
    assert length_buckets([]) == []
    assert len(length_buckets(["长" * 100, "长" * 300, "长" * 62], max_tokens=64)) == 1  # all read as 64 tokens


# ---------------------------------------------------------------------- through the app
async def _concurrently(app, requests):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))


def test_app_merges_concurrent_similarity_requests(sim):
    model = InstrumentedModel(sim)
    app = create_app(model, max_wait_ms=100)
    pairs = [("今天天气不错", "今天天气很好"), ("我喜欢北京", "我不喜欢北京"), ("电影不错", "苹果是红色的")] * 4
    responses = asyncio.run(_concurrently(app, [("/similarity", {"a": a, "b": b}) for a, b in pairs]))
    assert all(r.status_code == 200 for r in responses)
    got = [r.json()["scores"] for r in responses]
    np.testing.assert_allclose(got, [sim.similarity(a, b) for a, b in pairs], atol=1e-5)
    stats = app.state.batchers["encode"].stats
    assert sum(size for name, size in model.calls if name == "encode") == 6  # 24 texts, 6 distinct, once each
    assert stats.requests == 12 and stats.calls == 1 and stats.largest_call == 12


def test_app_merges_concurrent_similar_requests(sim):
    model = InstrumentedModel(sim)
    app = create_app(model, max_wait_ms=100)
    texts = ["今天天气不错", "我喜欢北京", "电影不错", "广州和深圳哪个好？", "科学技术是第一生产力。"]
    reqs = [("/similar", {"texts": t, "n": 6, "k": 2 + i % 3, "max_new_tokens": 8}) for i, t in enumerate(texts)]
    responses = asyncio.run(_concurrently(app, reqs))
    assert all(r.status_code == 200 for r in responses)
    for (_, body), r in zip(reqs, responses, strict=True):
        (item,) = r.json()["results"]
        assert item["text"] == body["texts"] and 0 < len(item["similar"]) <= body["k"]
    assert model.count("similar") == 1 and model.calls[0] == ("similar", 5)  # five requests, one generate


def test_app_never_merges_different_options_or_seeds(sim):
    model = InstrumentedModel(sim)
    app = create_app(model, max_wait_ms=100)
    reqs = [("/similar", {"texts": "今天天气不错", "n": 4, "k": 2, "max_new_tokens": 6, "seed": 1}),
            ("/similar", {"texts": "今天天气不错", "n": 4, "k": 2, "max_new_tokens": 6, "seed": 1}),
            ("/similar", {"texts": "我喜欢北京", "n": 5, "k": 2, "max_new_tokens": 6}),
            ("/similar", {"texts": "我喜欢北京", "n": 4, "k": 2, "max_new_tokens": 7})]
    responses = asyncio.run(_concurrently(app, reqs))
    assert model.count("similar") == 4
    a, b = (r.json()["results"][0]["similar"] for r in responses[:2])
    assert a == b  # a seeded request is reproducible, batching or not
    expected = sim.similar("今天天气不错", n=4, k=2, max_new_tokens=6, seed=1)
    assert [(x["text"], pytest.approx(x["score"], abs=1e-6)) for x in a] == expected


def test_app_without_batching_calls_the_model_per_request(sim):
    model = InstrumentedModel(sim)
    app = create_app(model, max_wait_ms=100, batching=False)
    responses = asyncio.run(_concurrently(app, [("/similarity", {"a": "今天", "b": f"明天{i}"}) for i in range(5)]))
    assert all(r.status_code == 200 for r in responses)
    assert app.state.batchers["encode"].stats.calls == 5
    assert model.count("encode") == 5


def test_request_timeout_is_504_and_busy_is_503(sim):
    slow = InstrumentedModel(sim, delay=0.3)
    app = create_app(slow, request_timeout_s=0.1, batching=False)
    (r,) = asyncio.run(_concurrently(app, [("/encode", {"texts": ["今天"]})]))
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"

    app = create_app(InstrumentedModel(sim, delay=0.2), max_queue=1, batching=False)
    responses = asyncio.run(_concurrently(app, [("/encode", {"texts": [f"今天{i}"]}) for i in range(4)]))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.json()["error"]["code"] == "busy" and busy.headers["retry-after"] == "1"
