"""Where the decoder stands against the hardware: tokens/s of `generate(text, n=100)` on the embedded
default model's real weights and on random weights, for a short question and a long sentence,
against full-recompute decoding, and as a fraction of this core's measured matmul peak.

* tokens/s counts every generated token (the [SEP] that ends a row included) over the median of
  repeats; the recompute decoder (bert4keras' way: the whole sequence re-run per token) decodes
  the same samples with the same seed.
* FLOPs per generated token: per layer 8H² (q, k, v, output) + 4HF (FFN) + 4SH (scores and values
  over S cached positions), then the LM head 2H² + 2HV; the peak is the median single-thread
  GFLOP/s of a (100 × H) @ (H × F) product, the shape of a decoding step, measured in the same run.
Usage: python benchmarks/decode.py [--quick] [--threads 1]
The same script measures an older checkout: PYTHONPATH=OLD/src python benchmarks/decode.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, generate_ids, small_model, timed  # noqa: E402

TEXTS = {"short": "广州和深圳哪个好？", "long": "我昨天在网上买的衣服到现在还没有发货，请问什么时候能送到？"}


def matmul_peak_gflops(hidden: int, ffn: int, rows: int = 100, repeats: int = 30) -> float:
    a, b = torch.randn(rows, hidden), torch.randn(hidden, ffn)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        times.append((time.perf_counter() - t0) / 20)
    times.sort()
    return 2 * rows * hidden * ffn / times[len(times) // 2] / 1e9


def flops_per_token(config, mean_positions: float) -> float:
    h, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    return layers * (8 * h * h + 4 * h * f + 4 * mean_positions * h) + 2 * h * h + 2 * h * v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-n", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from rosim.inference.sim_model import DEFAULT_MODEL_DIR, SimModel

    repeats = 1 if args.quick else 3
    models = {"default": SimModel.from_pretrained(DEFAULT_MODEL_DIR)}
    model, tok = small_model()
    models["random"] = SimModel(model, tok)
    peak = matmul_peak_gflops(384, 1536)
    record = {"bench": "decode", "n": args.n, "threads": torch.get_num_threads(), "matmul_peak_gflops": round(peak, 1)}
    for mname, sim in models.items():
        sim.model.float()
        for tname, text in TEXTS.items():
            max_new = 32 if mname == "default" else (12 if args.quick else 24)

            def cached(sim=sim, text=text, max_new=max_new):
                return generate_ids(sim, text, args.n, strategy="cache", max_new=max_new)

            def recompute(sim=sim, text=text, max_new=max_new):
                return generate_ids(sim, text, args.n, strategy="recompute", max_new=max_new)

            cached()
            t_c, out = timed(cached, repeats)
            t_r, out_r = timed(recompute, 1)
            tokens = sum(min(len(r) + 1, max_new) for r in out)  # + the [SEP] that ended the row
            src = len(sim.tokenizer.encode_ids(text)) + 2
            mean_len = sum(len(r) for r in out) / len(out)
            fpt = flops_per_token(sim.model.config, src + mean_len / 2)
            tps = tokens / t_c
            key = f"{mname}_{tname}"
            record[f"{key}_tokens_per_s"] = round(tps, 1)
            record[f"{key}_ratio_vs_recompute"] = round(t_r / t_c, 2)
            record[f"{key}_same_samples_as_recompute"] = out == out_r
            record[f"{key}_peak_fraction"] = round(fpt * tps / (peak * 1e9), 3)
            print(f"{key:14s} {tps:8.1f} tokens/s  x{t_r / t_c:5.1f} vs recompute  "
                  f"{fpt * tps / 1e9:5.1f} GFLOP/s = {fpt * tps / (peak * 1e9):.0%} of the {peak:.0f} GFLOP/s peak")
    emit(record)


if __name__ == "__main__":
    main()
