"""Load test of `rosim serve` on loopback: micro-batching on against off, same model, same load.

Two servers are started as separate processes (`rosim serve`, one with `--no-batching`), each on a
free 127.0.0.1 port, each computing on one torch thread unless --threads says otherwise (two cores:
one for the model, one for the clients and HTTP). For each endpoint (/similarity with a sentence
pair; /similar with n=8 candidates of 16 tokens, k=4) and each server, C concurrent clients send
requests back to back; each client stops at the deadline of its slice and requests in flight finish.
Reported: throughput (successful requests per second), p50/p99 latency, errors (non-200 answers or
transport failures), the server's resident memory before and after all its load, and how many model
calls the batched server made for how many requests. --quick: 8 clients x 4 s, n=4 candidates of 8 tokens.

The model is random-weight, shaped like RoFormer-Sim-small (6 layers, 384 hidden, 12000-char
vocabulary built from STS-B train), unless --model DIR is given. Random weights almost never sample
[SEP], so every /similar candidate has exactly 16 tokens in both modes.

The D seconds per endpoint and mode are cut into R slices (--rounds, default 3) run alternately
(on, off, off, on, ...), so that load from other processes drifts over both modes alike; each
endpoint's speedup is the median over rounds of batched/unbatched throughput.

Usage: python benchmarks/serve.py [--quick] [--model DIR] [--clients C] [--duration D] [--rounds R]
Last line: JSON with batching_speedup (geometric mean of the two endpoints' speedups), p99_ms (worst
p99 with batching on), errors (all runs), per-endpoint throughput and latency, RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import STSB_TEST, STSB_TRAIN, emit, small_model, sts_sentences  # noqa: E402

RUN_CLI = "import sys; from rosim.cli import main; sys.exit(main())"
SIMILAR = {"n": 8, "k": 4, "max_length": 16}
QUICK_SIMILAR = {"n": 4, "k": 2, "max_length": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, model_dir: Path, batching: bool, threads: int | None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", RUN_CLI, "serve", "--model", str(model_dir), "--port", str(self.port),
               "--log-level", "warning", "--max-queue", "4096", "--timeout", "300"]
        if not batching:
            cmd.append("--no-batching")
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(self.base + "/health", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"server did not start: {self.proc.communicate()[1][-2000:]}") from None
                time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def load(base: str, path: str, bodies: list[dict], clients: int, duration: float, seed: int) -> dict:
    """``clients`` loops posting to ``path`` until ``duration`` has passed; bounded in time and count."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(300.0)) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker(i: int) -> None:
            nonlocal errors
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop_at:
                body = rng.choice(bodies)
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def summarize(slices: list[dict]) -> dict:
    """Throughput over all slices of one (endpoint, mode), latency percentiles over all requests."""
    latencies = [x for sl in slices for x in sl["latencies"]]
    elapsed = sum(sl["elapsed"] for sl in slices)
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"requests": len(latencies), "errors": sum(sl["errors"] for sl in slices), "elapsed_s": round(elapsed, 2),
            "rps": round(len(latencies) / elapsed, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def _terminate(signum, frame):  # so that `finally` stops the servers when this script is killed
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8 clients x 4 s per run (under a minute in all)")
    ap.add_argument("--model", type=Path, default=None, help="rosim checkpoint (default: random small model)")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 50; quick 8)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of load per endpoint and mode (default 30; quick 4)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="the duration is cut into this many slices, modes alternating (default 3; quick 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per server (default 1: one core computes, the other runs the clients)")
    args = ap.parse_args()
    clients = args.clients or (8 if args.quick else 50)
    duration = args.duration or (4.0 if args.quick else 30.0)
    rounds = args.rounds or (2 if args.quick else 3)
    if clients <= 0 or clients > 1000 or duration <= 0 or duration > 600 or not 1 <= rounds <= 20:
        raise SystemExit("--clients must be 1..1000, --duration 0..600 s and --rounds 1..20")

    sentences = [s for s in sts_sentences(STSB_TEST) if s.strip()]
    rng = random.Random(0)
    pairs = [{"a": rng.choice(sentences), "b": rng.choice(sentences)} for _ in range(500)]
    similar_args = QUICK_SIMILAR if args.quick else SIMILAR
    similar = [{"texts": rng.choice(sentences), **similar_args} for _ in range(500)]

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rosim-bench-serve-") as tmp:
        model_dir = args.model
        if model_dir is None:
            from rosim.checkpoints.io import save_checkpoint

            model, tok = small_model(vocab_texts=sts_sentences(STSB_TRAIN))
            model_dir = save_checkpoint(Path(tmp) / "model", model, tok)
            del model
        print(f"model: {model_dir if args.model else 'random 6x384, 12000 vocab'}; {clients} clients x "
              f"{duration:g} s per endpoint and mode in {rounds} alternating slices; /similar with {similar_args}; {args.threads} torch thread(s) per server; "
              f"{os.cpu_count()} CPUs", flush=True)
        servers = {"batched": Server(model_dir, True, args.threads), "unbatched": Server(model_dir, False, args.threads)}
        results: dict[str, dict] = {}
        try:
            for s in servers.values():
                s.wait_ready()
            print(f"servers ready after {time.perf_counter() - t_start:.1f} s", flush=True)
            rss_before = {}
            for name, s in servers.items():  # warm-up: first calls allocate
                for body in pairs[:4]:
                    httpx.post(s.base + "/similarity", json=body, timeout=120).raise_for_status()
                httpx.post(s.base + "/similar", json=similar[0], timeout=120).raise_for_status()
                rss_before[name] = rss_mb(s.proc.pid)
            ratios: dict[str, list[float]] = {}
            for endpoint, bodies in (("/similarity", pairs), ("/similar", similar)):
                slices: dict[str, list[dict]] = {name: [] for name in servers}
                for r in range(rounds):  # alternate the modes so that drifting load hits both alike
                    order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                    for name in order:
                        sl = asyncio.run(load(servers[name].base, endpoint, bodies, clients, duration / rounds,
                                              seed=r * 2 + (name == "batched")))
                        slices[name].append(sl)
                    a, b = (len(slices[m][-1]["latencies"]) / slices[m][-1]["elapsed"] for m in servers)
                    ratios.setdefault(endpoint.strip("/"), []).append(a / max(b, 1e-9))
                for name in servers:
                    res = results[f"{endpoint.strip('/')}_{name}"] = summarize(slices[name])
                    print(f"{endpoint:12s} {name:10s} {res['rps']:8.1f} req/s  p50 {res['p50_ms']:8.1f} ms  "
                          f"p99 {res['p99_ms']:8.1f} ms  errors {res['errors']}", flush=True)
                print(f"{endpoint:12s} speedup per round: {', '.join(f'{x:.2f}' for x in ratios[endpoint.strip('/')])}",
                      flush=True)
            stats = {name: s.health()["batching"] for name, s in servers.items()}
            rss_after = {name: rss_mb(s.proc.pid) for name, s in servers.items()}
        finally:
            for s in servers.values():
                s.stop()

    for name in servers:
        merged = {k: f"{v['requests']} requests in {v['model_calls']} model calls ({v['model_seconds']:.1f} s)"
                  for k, v in stats[name].items() if isinstance(v, dict) and v["requests"]}
        print(f"{name}: RSS {rss_before[name]:.0f} MB -> {rss_after[name]:.0f} MB; {merged}")
    speedups = {e: float(np.median(ratios[e])) for e in ("similarity", "similar")}  # median over rounds
    record = {
        "bench": "serve",
        "clients": clients,
        "duration_s": duration,
        "rounds": rounds,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "similar_request": similar_args,
        "batching_speedup": round(math.sqrt(speedups["similarity"] * speedups["similar"]), 2),
        "similarity_speedup": round(speedups["similarity"], 2),
        "similar_speedup": round(speedups["similar"], 2),
        "p99_ms": max(results["similarity_batched"]["p99_ms"], results["similar_batched"]["p99_ms"]),
        "errors": sum(r["errors"] for r in results.values()),
        **{f"{k}_{m}": v[m] for k, v in results.items() for m in ("rps", "p50_ms", "p99_ms")},
        "rss_mb_before": round(rss_before["batched"], 1),
        "rss_mb_after": round(rss_after["batched"], 1),
        "rss_mb_before_unbatched": round(rss_before["unbatched"], 1),
        "rss_mb_after_unbatched": round(rss_after["unbatched"], 1),
        "model_calls_batched": sum(v["model_calls"] for v in stats["batched"].values() if isinstance(v, dict)),
        "requests_batched": sum(v["requests"] for v in stats["batched"].values() if isinstance(v, dict)),
    }
    emit(record)


if __name__ == "__main__":
    main()
