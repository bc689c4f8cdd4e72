"""Gradient cache vs plain steps: peak memory, time and gradient error of one contrastive step.

Model: a 6-layer, 384-hidden RoFormer (``transformers.RoFormerModel``, 6 heads, FFN 1536, vocab 12000,
random weights) with a linear pooler on [CLS]; RoFormer-Sim's in-batch contrastive loss (scale 20).

- ``gradcache``: one step at batch N in chunks of C (``rosim.training.gradcache``);
- ``plain_full``: the plain full-batch step at batch N (the time reference);
- ``plain_chunk``: the plain step at batch C (the memory reference);
- ``plain_accum`` (full run only): plain gradient accumulation over the N/C chunks, each with its own
  loss (not the large-batch gradient): the memory floor of any chunked method, for comparison.

Peak memory: each variant runs in a fresh subprocess (glibc told to ``mmap`` large blocks so freed
memory leaves the RSS); after a warm-up, the peak RSS (VmHWM, reset through ``/proc/self/clear_refs``)
minus the RSS just before the step, parameter gradients included. Time: the median of repeats in
this process, the two variants interleaved, dropout on. Gradient error: dropout off (the exactness
with dropout is what ``tests/training/test_gradcache.py`` checks), gradcache vs plain full batch
(``--quick``: on a batch of 32 in chunks of 8, to save time).

    python benchmarks/gradcache.py [--quick]      # last stdout line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from rosim.training.gradcache import gradcache_backward
from rosim.training.losses import roformer_sim_contrastive_loss

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 12000, 384, 6, 6, 1536


class Encoder(nn.Module):
    """RoFormer + linear pooler on [CLS]."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        from transformers import RoFormerConfig, RoFormerModel

        cfg = RoFormerConfig(
            vocab_size=VOCAB, embedding_size=HIDDEN, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=128,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0,  # RoFormer-Sim: no attention dropout
        )
        self.roformer = RoFormerModel(cfg)
        self.pooler = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.roformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pooler(h[:, 0])


def make_batch(n: int, seq_len: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, seq_len), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def plain_step(model: nn.Module, batch: dict) -> float:
    loss = roformer_sim_contrastive_loss(model(**batch))
    loss.backward()
    return loss.item()


def gradcache_step(model: nn.Module, batch: dict, chunk: int) -> float:
    return gradcache_backward(model, [batch], roformer_sim_contrastive_loss, chunk).item()


def run_variant(model: nn.Module, variant: str, batch: dict, chunk: int) -> float:
    if variant == "gradcache":
        return gradcache_step(model, batch, chunk)
    if variant == "plain_accum":
        n = len(batch["input_ids"])
        return sum(plain_step(model, {k: v[s:s + chunk] for k, v in batch.items()}) for s in range(0, n, chunk))
    if variant == "plain_chunk":
        return plain_step(model, {k: v[:chunk] for k, v in batch.items()})
    return plain_step(model, batch)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, n: int, chunk: int, seq_len: int) -> dict:
    """Runs in a fresh process: peak RSS increase of one step of ``variant``."""
    import gc
    import resource

    torch.manual_seed(0)
    model = Encoder().train()
    batch = make_batch(n, seq_len)
    plain_step(model, make_batch(2, seq_len, seed=3))  # warm-up: kernels, thread pools
    model.zero_grad(set_to_none=True)
    gc.collect()
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (peak since start: an upper bound)"
    torch.manual_seed(2)
    run_variant(model, variant, batch, chunk)
    peak = _status_kb("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "peak_delta_mb": (peak - base) / 1024, "base_mb": base / 1024, "method": method}


def measure_memory(variant: str, n: int, chunk: int, seq_len: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--_memory-child", variant, "--batch", str(n), "--chunk", str(chunk),
           "--seq-len", str(seq_len), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 128, one repeat (< 60 s on 2 cores)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, loaded machine several OpenMP threads per process "
                         "make every small kernel wait for a descheduled thread, which distorts chunked timings)")
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.batch or (128 if args.quick else 512)
    if args.memory_child:
        torch.set_num_threads(args.threads)
        print(json.dumps(memory_child(args.memory_child, n, args.chunk, args.seq_len)))
        return
    repeats = args.repeats or (1 if args.quick else 3)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)

    variants = ["plain_chunk", "gradcache"] + ([] if args.quick else ["plain_accum", "plain_full"])
    mem = {v: measure_memory(v, n, args.chunk, args.seq_len, args.threads) for v in variants}
    for v, m in mem.items():
        print(f"memory  {v:12s} peak +{m['peak_delta_mb']:8.1f} MB", file=sys.stderr)

    torch.manual_seed(0)
    model = Encoder().train()
    batch = make_batch(n, args.seq_len)
    plain_step(model, make_batch(2, args.seq_len, seed=3))  # warm-up
    times: dict[str, list[float]] = {"plain_full": [], "gradcache": []}
    for r in range(repeats):
        for v in times:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(10 + r)
            t = time.perf_counter()
            run_variant(model, v, batch, args.chunk)
            times[v].append(time.perf_counter() - t)
            print(f"time    {v:12s} {times[v][-1]:8.2f} s", file=sys.stderr)
    t_plain, t_gc = statistics.median(times["plain_full"]), statistics.median(times["gradcache"])

    model.eval()  # gradient check without dropout: the plain full batch is then the exact reference
    check_n, check_chunk = (32, 8) if args.quick else (n, args.chunk)
    check = {k: v[:check_n] for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    loss_ref = plain_step(model, check)
    g_ref = flat_grad(model)
    model.zero_grad(set_to_none=True)
    loss_gc = gradcache_step(model, check, check_chunk)
    g_gc = flat_grad(model)
    grad_rel_err = float((g_gc - g_ref).norm() / g_ref.norm())

    mem_ratio = mem["gradcache"]["peak_delta_mb"] / mem["plain_chunk"]["peak_delta_mb"]
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    mem_ratio_w = (mem["gradcache"]["peak_delta_mb"] + weights_mb) / (mem["plain_chunk"]["peak_delta_mb"] + weights_mb)
    time_ratio = t_gc / t_plain
    result = {
        "bench": "gradcache",
        "quick": args.quick,
        "model": f"RoFormer {LAYERS}L-{HIDDEN}H-{HEADS}A ffn {FFN} vocab {VOCAB} + linear pooler (random weights)",
        "batch": n,
        "chunk": args.chunk,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "grad_rel_err": grad_rel_err,
        "grad_check": f"dropout off, batch {check_n}, chunk {check_chunk}",
        "loss_rel_err": abs(loss_gc - loss_ref) / abs(loss_ref),
        "peak_mem_mb": {v: round(m["peak_delta_mb"], 1) for v, m in mem.items()},
        "mem_method": mem["gradcache"]["method"],
        "mem_ratio_vs_chunk_batch": round(mem_ratio, 3),
        "mem_ratio_target": 1.3,
        "weights_mb": round(weights_mb, 1),
        "mem_ratio_vs_chunk_batch_incl_weights": round(mem_ratio_w, 3),
        "time_s": {"plain_full": round(t_plain, 2), "gradcache": round(t_gc, 2)},
        "time_ratio_vs_full_batch": round(time_ratio, 3),
        "time_ratio_target": 1.5,
        "targets_met": bool(mem_ratio <= 1.3 and time_ratio <= 1.5 and grad_rel_err <= 1e-5),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if "plain_full" in mem:
        result["mem_ratio_vs_full_batch"] = round(mem["gradcache"]["peak_delta_mb"] / mem["plain_full"]["peak_delta_mb"], 3)
        result["mem_ratio_vs_plain_accum"] = round(mem["gradcache"]["peak_delta_mb"] / mem["plain_accum"]["peak_delta_mb"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
