"""Issue 17 item 3: /similar generates in its own process (rosim.server.generation).

Results equal the library's for a seed; a call that has started stops when its client disconnects;
a child that dies is answered 503 at once and started again; stopping the app leaves no child.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from rosim.server import MicroBatcher, create_app
from rosim.server.batching import CallCancelled
from rosim.server.generation import GenerationProcess
from tests.server.conftest import load_deaf, load_tiny
from tests.server.test_admission import _raw, serving

SLOW = 0.05  # seconds per forward pass in the slow child: 64 decoding steps take over 3 s


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_similar_in_the_process_equals_the_library_and_stopping_leaves_no_child(sim):
    generation = GenerationProcess(load_tiny)
    app = create_app(sim, generation=generation)
    with TestClient(app) as client:
        assert generation.wait_ready(120), generation.failure
        pid = generation.pid
        body = {"texts": ["今天天气不错", "我喜欢北京"], "n": 8, "k": 3, "seed": 7, "max_new_tokens": 12}
        r = client.post("/similar", json=body)
        assert r.status_code == 200, r.text
        expected = sim.similar(["今天天气不错", "我喜欢北京"], n=8, k=3, seed=7, max_new_tokens=12)
        got = [[(s["text"], s["score"]) for s in item["similar"]] for item in r.json()["results"]]
        assert [[t for t, _ in row] for row in got] == [[t for t, _ in row] for row in expected]
        for row, want in zip(got, expected, strict=True):
            assert [v for _, v in row] == pytest.approx([v for _, v in want], abs=1e-6)
        again = client.post("/similar", json={"texts": "今天", "n": 4, "k": 2, "top_p": 0.9, "max_new_tokens": 4})
        assert again.status_code == 200  # the child answers more than once
        health = client.get("/health").json()["generation"]
        assert health == {"mode": "process", "status": "ready", "pid": pid, "threads": 1, "calls": 2,
                          "cancelled": 0, "crashes": 0, "restarts": 0}
        assert client.get("/health").json()["batching"]["similar"]["model_calls"] == 2
    assert health["pid"] != os.getpid()
    assert _gone(pid) and generation.health()["status"] == "stopped"


@pytest.fixture(scope="module")
def slow_server(sim):
    generation = GenerationProcess(functools.partial(load_tiny, SLOW))
    with serving(create_app(sim, generation=generation, batching=False)) as port:
        assert generation.wait_ready(120), generation.failure
        yield f"http://127.0.0.1:{port}", port, generation
    assert generation.pid is None or _gone(generation.pid)


LONG = {"texts": "今天天气不错", "n": 4, "k": 2, "max_new_tokens": 64}


def test_a_started_call_stops_when_its_client_disconnects(slow_server):
    base, port, generation = slow_server
    before = httpx.get(base + "/health").json()["generation"]
    body = httpx.Request("POST", base + "/similar", json=LONG).read()
    conn = _raw(port, b"POST /similar HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.6)  # the child is decoding now
    conn.close()
    t0 = time.monotonic()
    _wait_for(lambda: httpx.get(base + "/health").json()["generation"]["cancelled"] == before["cancelled"] + 1)
    assert time.monotonic() - t0 < 2.0  # stopped within a few decoding steps: all 64 would take over 2.6 s more
    after = httpx.get(base + "/health").json()
    assert after["generation"]["calls"] == before["calls"] and after["generation"]["status"] == "ready"
    quick = httpx.post(base + "/similar", json={**LONG, "max_new_tokens": 2}, timeout=30)
    assert quick.status_code == 200 and after["generation"]["pid"] == generation.pid


def test_a_crashed_child_is_a_503_and_is_started_again(slow_server):
    base, _, generation = slow_server
    pid = generation.pid
    answer: dict = {}

    def post():
        answer["r"] = httpx.post(base + "/similar", json=LONG, timeout=30)
        answer["at"] = time.monotonic()

    thread = threading.Thread(target=post)
    thread.start()
    time.sleep(0.6)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    r = answer["r"]
    assert r.status_code == 503 and answer["at"] - killed < 1.0, r.text
    assert r.json()["error"]["code"] == "generation_unavailable" and int(r.headers["retry-after"]) >= 1
    t0 = time.perf_counter()
    again = httpx.post(base + "/similar", json=LONG, timeout=30)  # while the new child loads: 503 at once
    if again.status_code == 503:
        assert time.perf_counter() - t0 < 1.0 and "restarting" in again.json()["error"]["message"]
    assert generation.wait_ready(120), generation.failure
    assert generation.pid != pid and _gone(pid)
    ok = httpx.post(base + "/similar", json={**LONG, "max_new_tokens": 2}, timeout=30)
    assert ok.status_code == 200
    health = httpx.get(base + "/health").json()["generation"]
    assert health["crashes"] == 1 and health["restarts"] == 1 and health["status"] == "ready"


def test_a_child_that_does_not_stop_a_cancelled_call_is_replaced():
    from rosim.server.generation import GenerationUnavailable

    generation = GenerationProcess(load_deaf, cancel_grace_s=0.3)
    generation.start()
    try:
        assert generation.wait_ready(120), generation.failure
        pid, cancel = generation.pid, threading.Event()
        threading.Timer(0.2, cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(GenerationUnavailable):
            generation.similar(["今天"], cancel=cancel, n=2)
        assert time.monotonic() - t0 < 5  # 0.2 s + 0.3 s of grace, then killed: not the model's 60 s
        _wait_for(lambda: generation.counters["restarts"] == 1)
        assert generation.counters["crashes"] == 0 and generation.pid != pid and _gone(pid)
    finally:
        generation.close()
    assert _gone(generation.pid)


def test_a_call_whose_callers_all_left_is_told_to_stop():
    started = threading.Event()
    seen: list[bool] = []

    def run(key, items, cancel):
        started.set()
        seen.append(cancel.wait(5))
        raise CallCancelled("stopped")

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(run, ex, max_batch=8, max_wait_ms=20, cancellable=True)
            jobs = [asyncio.ensure_future(b.submit("k", [i])) for i in range(2)]
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
            jobs[0].cancel()
            await asyncio.sleep(0.05)
            assert not seen  # one caller is still there
            jobs[1].cancel()
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.02)
            await b.aclose()
            return b

    b = asyncio.run(main())
    assert seen == [True] and b.stats.calls == 1
    assert b.seconds_per_cost is None  # a call cut short measures nothing




def test_the_child_yields_the_cores_to_the_server(slow_server):
    """Under overload the server's event loop and /encode must go first (benchmarks/serve.py --overload:
    /encode p99 552 ms and a 1.2 s 503 at 64 clients with the child at the server's priority)."""
    from rosim.server.generation import CHILD_NICENESS

    _, _, generation = slow_server
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, generation.pid) == min(19, mine + CHILD_NICENESS)
