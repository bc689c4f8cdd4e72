"""Stage-1 training throughput and peak memory, RoFormer-Sim-small shape, with and without gradient caching.

One optimiser step = the real stage-1 objective (UniLM forward, generation loss on target tokens,
in-batch contrastive loss over pooled vectors, backward) + AdamW. Rows are STS-B sentence pairs
(both directions, half of the sources whole-word masked), as the trainer builds them.

Each variant runs in its own subprocess so that its peak memory is its own: on CPU the peak
resident set size (``ru_maxrss``) and its growth over the set-up (model, optimiser, batches); on
CUDA ``torch.cuda.max_memory_allocated``. The reference is the plain full-batch step; "gradcache"
is the same step with ``chunk_size`` rows per forward (identical gradients, see
tests/training/test_trainer.py).

Usage: python benchmarks/train.py [--quick] [--device cpu|cuda] [--batch-size N] [--chunk-size N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import STSB_TRAIN, emit, small_model  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pairs(n: int) -> list[tuple[str, str]]:
    pairs = []
    for line in STSB_TRAIN.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip() and parts[1].strip():
            pairs.append((parts[0], parts[1]))
        if len(pairs) >= n:
            break
    return pairs


def run_variant(args) -> dict:
    import torch

    from rosim.training.data import PairBatcher, cut_text
    from rosim.training.stages import Stage1Objective, StepContext
    from rosim.training.trainer import make_optimizer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    model, tok = small_model()
    model.to(device).train()
    optimizer = make_optimizer(model, 1e-5, 0.01)
    batcher = PairBatcher(tok, maxlen=64, seed=0)
    pool = [(cut_text(a, 64), cut_text(b, 64)) for a, b in _pairs(args.batch_size // 2 * (args.steps + 1))]
    half = args.batch_size // 2
    batches = [batcher(pool[i * half:(i + 1) * half], i) for i in range(args.steps + 1)]
    objective = Stage1Objective()
    ctx = StepContext(device=device, chunk_size=args.chunk_size,
                      autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    base_rss = _rss_mb()

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        parts = objective.backward(model, batch, ctx)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return parts

    step(batches[0])  # warm-up (allocates the optimiser moments)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for b in batches[1:]:
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
        tokens.append(b.num_tokens)
    med = statistics.median(times)
    record = {
        "chunk_size": args.chunk_size, "batch_rows": args.batch_size, "steps": args.steps,
        "median_step_s": round(med, 4), "tokens_per_s": round(statistics.mean(tokens) / med, 1),
    }
    if device.type == "cuda":
        record["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["peak_mem_mb"] = round(peak, 1)
        record["peak_growth_mb"] = round(peak - base_rss, 1)
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="rows per step (default 96; 24 with --quick)")
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per gradient-cache chunk (default batch/6)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--variant", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    batch = args.batch_size or (24 if args.quick else 96)
    chunk = args.chunk_size or max(2, batch // 6)
    steps = args.steps or (2 if args.quick else 4)
    results = {}
    for name, c in (("full_batch", 0), ("gradcache", chunk)):
        cmd = [sys.executable, __file__, "--variant", "--device", args.device, "--batch-size", str(batch),
               "--chunk-size", str(c), "--steps", str(steps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"variant {name} failed")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr)
    full, gc = results["full_batch"], results["gradcache"]
    mem_key = "peak_mem_mb" if args.device != "cpu" else "peak_growth_mb"
    emit({
        "bench": "train_stage1", "device": args.device, "model": "L6-H384-A6 vocab 12000",
        "batch_rows": batch, "chunk_size": chunk,
        "ours_tokens_per_s": gc["tokens_per_s"], "baseline": "full_batch (no gradient cache)",
        "baseline_tokens_per_s": full["tokens_per_s"],
        "ratio": round(gc["tokens_per_s"] / full["tokens_per_s"], 3),
        "gradcache_peak_mem_mb": gc["peak_mem_mb"], "full_batch_peak_mem_mb": full["peak_mem_mb"],
        "gradcache_mem_growth_mb": gc.get(mem_key), "full_batch_mem_growth_mb": full.get(mem_key),
        "memory_ratio": round(gc[mem_key] / full[mem_key], 3) if full.get(mem_key) else None,
    })


if __name__ == "__main__":
    main()
