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

--overload: the claim of issue 17 item 3, that the server sheds load instead of queueing without
bound. One server (`rosim serve` with its defaults: the embedded model unless --model, admission
control on) gets 16, then 32, then 64 concurrent clients for D seconds each (default 20; quick 4):
7 of every 8 clients post /similar (n=100, k=5, as in the issue; quick n=20) and the rest /encode,
back to back, with a 30 s client timeout, and honour Retry-After after a 503 (as a polite client does).
Reported per level and endpoint: p50/p95/p99 of the answered requests, counts of 200 / 503 / other /
client timeouts, the slowest 503, the server's peak RSS (its generation process included), and how
long the server kept computing after the clients stopped. Generation runs in the server's generation
process (`rosim serve`'s default); the JSON also gives that process's counters (calls, calls stopped
early, crashes). Last line: JSON with `ok` true when every request was answered 200 or got a 503
within 1 s, no client timed out, and /encode p99 stayed under 0.5 s at every level.
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
SIMILAR = {"n": 8, "k": 4, "max_new_tokens": 16}
QUICK_SIMILAR = {"n": 4, "k": 2, "max_new_tokens": 8}


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
               "--log-level", "warning", "--max-queue", "4096", "--timeout", "300",
               "--max-queue-wait", "300"]  # throughput of batching: no load shedding here
        if not batching:
            cmd.append("--no-batching")
        if threads:
            cmd += ["--threads", str(threads), "--generation-threads", str(threads)]
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


# ---------------------------------------------------------------------- --overload
OVERLOAD_LEVELS = (16, 32, 64)
CLIENT_TIMEOUT_S = 30.0


class RssSampler:
    """The server's peak resident memory (its processes' together), sampled every 0.2 s in a thread."""

    def __init__(self, *pids: int):
        import threading

        self.pids, self._stop = pids, threading.Event()
        self.peak = self._total()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, self._total())
            except OSError:
                return

    def _total(self) -> float:
        return sum(rss_mb(pid) for pid in self.pids)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


async def mixed_load(base: str, plan: list[tuple[str, list[dict]]], duration: float, seed: int) -> dict:
    """One client per entry of ``plan`` (endpoint, bodies), posting back to back for ``duration`` s."""
    out = {path: {"ok": [], "busy": [], "other": 0, "timeouts": 0} for path in {p for p, _ in plan}}
    limits = httpx.Limits(max_connections=len(plan), max_keepalive_connections=len(plan))
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(CLIENT_TIMEOUT_S)) as client:
        stop_at = time.perf_counter() + duration

        async def worker(i: int, path: str, bodies: list[dict]) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=rng.choice(bodies))
                except httpx.TimeoutException:
                    out[path]["timeouts"] += 1
                    continue
                except httpx.HTTPError:
                    out[path]["other"] += 1
                    continue
                took = time.perf_counter() - t0
                if r.status_code == 200:
                    out[path]["ok"].append(took)
                elif r.status_code == 503:
                    out[path]["busy"].append(took)
                    wait = min(float(r.headers.get("retry-after", "1")), stop_at - time.perf_counter())
                    await asyncio.sleep(max(wait, 0.0))
                else:
                    out[path]["other"] += 1

        await asyncio.gather(*(worker(i, path, bodies) for i, (path, bodies) in enumerate(plan)))
    return out


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


def overload_main(args) -> None:
    duration = args.duration or (4.0 if args.quick else 20.0)
    n = 20 if args.quick else 100
    sentences = [s for s in sts_sentences(STSB_TEST) if s.strip()]
    rng = random.Random(0)
    similar = [{"texts": rng.choice(sentences), "n": n, "k": 5} for _ in range(200)]
    encode = [{"texts": [rng.choice(sentences)]} for _ in range(200)]
    t_start = time.perf_counter()
    model_dir = args.model
    cmd = [sys.executable, "-c", RUN_CLI, "serve", "--port", "0", "--log-level", "warning"]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    if args.threads:
        cmd += ["--threads", str(args.threads), "--generation-threads", str(args.threads)]
    port = free_port()
    cmd[cmd.index("0")] = str(port)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = Server.__new__(Server)
    server.port, server.base, server.proc = port, f"http://127.0.0.1:{port}", proc
    print(f"model: {model_dir or 'embedded default'}; levels {OVERLOAD_LEVELS} clients x {duration:g} s; "
          f"/similar n={n} k=5 for 7 of 8 clients, /encode one text for the rest; client timeout "
          f"{CLIENT_TIMEOUT_S:g} s; {args.threads} torch thread(s) for encoding and {args.threads} in the generation "
          f"process; {os.cpu_count()} CPUs",
          flush=True)
    levels: dict[str, dict] = {}
    ok = True
    try:
        server.wait_ready()
        httpx.post(server.base + "/similar", json=similar[0], timeout=120).raise_for_status()  # warm-up
        httpx.post(server.base + "/encode", json=encode[0], timeout=120).raise_for_status()
        for clients in OVERLOAD_LEVELS:
            n_encode = max(2, clients // 8)
            plan = [("/encode", encode)] * n_encode + [("/similar", similar)] * (clients - n_encode)
            child = (server.health().get("generation") or {}).get("pid")
            sampler = RssSampler(proc.pid, *([child] if child else []))
            res = asyncio.run(mixed_load(server.base, plan, duration, seed=clients))
            t_end = time.perf_counter()
            while True:  # how long the server keeps computing once every client has its answer
                h = server.health()["batching"]
                if all(not isinstance(v, dict) or v["queued"] == 0 for v in h.values()):
                    break
                time.sleep(0.1)
            drain_s = time.perf_counter() - t_end
            peak = sampler.stop()
            level: dict = {"clients": clients, "rss_mb_peak": round(peak, 1), "drain_s": round(drain_s, 2)}
            for path, r in res.items():
                name = path.strip("/")
                level[name] = {"ok": len(r["ok"]), "busy_503": len(r["busy"]), "other": r["other"],
                               "timeouts": r["timeouts"], "p50_ms": _pct(r["ok"], 50), "p95_ms": _pct(r["ok"], 95),
                               "p99_ms": _pct(r["ok"], 99), "slowest_503_ms": _pct(r["busy"], 100)}
                e = level[name]
                ok &= e["timeouts"] == 0 and e["other"] == 0 and (not r["busy"] or max(r["busy"]) < 1.0)
                print(f"{clients:3d} clients {path:9s} 200 {e['ok']:5d}  503 {e['busy_503']:5d}  other {e['other']}  "
                      f"timeouts {e['timeouts']}  p50 {e['p50_ms']} ms  p95 {e['p95_ms']} ms  p99 {e['p99_ms']} ms  "
                      f"slowest 503 {e['slowest_503_ms']} ms", flush=True)
            enc_p99 = level["encode"]["p99_ms"]
            ok &= enc_p99 is not None and enc_p99 < 500
            print(f"{clients:3d} clients: server RSS peak {peak:.0f} MB; idle {drain_s:.2f} s after the load", flush=True)
            levels[str(clients)] = level
        full = server.health()
        health, generation = full["batching"], full.get("generation")
    finally:
        server.stop()
    emit({"bench": "serve_overload", "generation": generation, "ok": bool(ok), "duration_s": duration, "similar_n": n,
          "client_timeout_s": CLIENT_TIMEOUT_S, "wall_s": round(time.perf_counter() - t_start, 1),
          "rejected": {k: v["rejected"] for k, v in health.items() if isinstance(v, dict)},
          "dropped": {k: v["dropped"] for k, v in health.items() if isinstance(v, dict)},
          "levels": levels})


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
    ap.add_argument("--overload", action="store_true",
                    help="the admission-control test at 16/32/64 clients instead of batching on/off")
    args = ap.parse_args()
    if args.overload:
        if args.duration is not None and not 0 < args.duration <= 600:
            raise SystemExit("--duration must be 0..600 s")
        return overload_main(args)
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
