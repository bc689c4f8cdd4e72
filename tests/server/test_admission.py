"""Issue 17 item 3: the server sheds load instead of queueing without bound.

A real uvicorn server on a loopback port (in a thread), with generation made slow: overload is
answered 503 + Retry-After at once and counted in /health, /encode is not queued behind /similar,
the work of a client that disconnected is dropped, and slow headers or bodies are cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from rosim.server import MicroBatcher, QueueFull, create_app
from rosim.server.protocol import header_timeout_protocol
from tests.server.conftest import InstrumentedModel


class SlowGeneration(InstrumentedModel):
    """Generation takes ``delay`` seconds per call; encoding is as fast as the model."""

    def similar(self, texts, **kw):
        with self._lock:
            self.calls.append(("similar", len(texts)))
        time.sleep(self.delay)
        return self.model.similar(texts, **kw)

    def encode(self, texts, **kw):
        with self._lock:
            self.calls.append(("encode", len(texts)))
        return self.model.encode(texts, **kw)


@contextlib.contextmanager
def serving(app, header_timeout_s: float = 0.5):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(app, log_level="warning", http=header_timeout_protocol(header_timeout_s),
                            timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _raw(port: int, data: bytes) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(data)
    return conn


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


SIMILAR = {"texts": "今天天气不错", "n": 4, "k": 2, "max_new_tokens": 4}


def test_overload_is_a_fast_503_with_retry_after_and_counted(sim):
    model = SlowGeneration(sim, delay=0.4)
    app = create_app(model, batching=False, max_queue_s=0.5)
    with serving(app) as port:
        base = f"http://127.0.0.1:{port}"
        assert httpx.post(base + "/similar", json=SIMILAR, timeout=30).status_code == 200  # measures the speed

        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                async def one(path, body):
                    t0 = time.perf_counter()
                    r = await client.post(path, json=body)
                    return path, r, time.perf_counter() - t0

                similar = [asyncio.ensure_future(one("/similar", SIMILAR)) for _ in range(12)]
                await asyncio.sleep(0.3)  # generation is saturated now
                encodes = [await one("/encode", {"texts": [f"今天{i}"]}) for i in range(5)]
                return await asyncio.gather(*similar), encodes

        similar, encodes = asyncio.run(burst())
        codes = [r.status_code for _, r, _ in similar]
        assert set(codes) == {200, 503}, codes
        assert codes.count(503) >= 9, codes  # a call takes 0.4 s and the budget is 0.5 s: one at a time
        for _, r, took in similar:
            if r.status_code == 503:
                assert took < 1.0
                assert r.json()["error"]["code"] == "busy" and int(r.headers["retry-after"]) >= 1
        # /encode runs on its own thread: never behind the queued generation
        assert all(r.status_code == 200 for _, r, _ in encodes)
        assert max(took for *_, took in encodes) < 0.5, [took for *_, took in encodes]
        health = httpx.get(base + "/health").json()["batching"]
    assert health["similar"]["rejected"] == codes.count(503)
    assert model.count("similar") == 1 + codes.count(200)


def test_work_of_a_disconnected_client_is_dropped(sim):
    model = SlowGeneration(sim, delay=0.6)
    app = create_app(model, batching=False)
    with serving(app) as port:
        base = f"http://127.0.0.1:{port}"
        first = threading.Thread(target=httpx.post, args=(base + "/similar",), kwargs={"json": SIMILAR, "timeout": 30})
        first.start()
        time.sleep(0.2)  # the first generation is running
        body = httpx.Request("POST", base + "/similar", json={**SIMILAR, "seed": 3}).read()
        gone = _raw(port, b"POST /similar HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.1)
        gone.close()  # the client gives up while its request waits
        first.join(30)
        time.sleep(1.0)  # when the first call ends, the worker would take the next job
        stats = httpx.get(base + "/health").json()["batching"]["similar"]
    assert model.count("similar") == 1, model.calls
    assert stats["dropped"] == 1 and stats["requests"] == 2


def test_unfinished_headers_are_closed(sim):
    app = create_app(sim)
    with serving(app, header_timeout_s=0.5) as port:
        conn = _raw(port, b"POST /encode HTTP/1.1\r\nHost: t\r\n")
        t0 = time.monotonic()
        assert _read_all(conn) == b""
        assert time.monotonic() - t0 < 3
        # a complete request on a fresh connection is unaffected, even when the answer takes longer
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200


def test_a_body_shorter_than_its_content_length_gets_408(sim):
    app = create_app(sim, body_timeout_s=0.5)
    with serving(app) as port:
        conn = _raw(port, b"POST /encode HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"texts\": [")
        t0 = time.monotonic()
        answer = _read_all(conn)
        assert time.monotonic() - t0 < 3
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer


def test_batcher_refuses_work_beyond_its_wait_budget():
    from concurrent.futures import ThreadPoolExecutor

    def slow(key, items):
        time.sleep(0.1 * len(items))
        return items

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(slow, ex, max_batch=1, max_wait_ms=0, max_queue=100, max_queue_s=0.35)
            await b.submit("k", [0])  # measured: 0.1 s per item
            running = [asyncio.ensure_future(b.submit("k", [i])) for i in range(1, 4)]
            await asyncio.sleep(0.01)
            with pytest.raises(QueueFull) as refused:
                await b.submit("k", [9])
            await asyncio.gather(*running)
            return b, refused.value

    b, refused = asyncio.run(main())
    assert refused.retry_after_s >= 1 and "retry" in str(refused)
    assert b.stats.rejected == 1 and b.seconds_per_cost == pytest.approx(0.1, rel=0.5)


def test_before_any_measurement_at_most_one_call_of_work_waits():
    from concurrent.futures import ThreadPoolExecutor

    def slow(key, items):
        time.sleep(0.2)
        return items

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(slow, ex, max_batch=4, max_wait_ms=0, max_queue=100, max_queue_s=10)
            jobs = [asyncio.ensure_future(b.submit("k", [i], cost=4)) for i in range(5)]
            results = await asyncio.gather(*jobs, return_exceptions=True)
            return results

    results = asyncio.run(main())
    assert [isinstance(r, QueueFull) for r in results] == [False, True, True, True, True]
