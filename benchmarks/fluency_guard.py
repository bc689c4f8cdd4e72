"""What the fluency guard of `similar` changes, on the same generated candidates.

For each sentence of a panel (benchmarks/data/panel_zh.txt: 10 questions, 10 statements or
commands, 5 long and 5 short sentences), `similar` runs twice with the same seed, so both rankings
see the same candidates: once without the guard (min_fluency=None: cosine only) and once with it.
Prints both top-k lists side by side for reading, and as its last line a JSON object with the
share of top-k outputs that repeat a unit more than the input, their mean generator
log-probability per token, and the guard's time overhead.

    python benchmarks/fluency_guard.py [--model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rosim.inference.sim_model import (
    DEFAULT_MIN_FLUENCY,
    DEFAULT_MODEL_DIR,
    SimModel,
    repeats_more_than_source,
)

PANEL = Path(__file__).parent / "data" / "panel_zh.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="rosim checkpoint (default: the embedded model)")
    ap.add_argument("--panel", type=Path, default=PANEL)
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="10 sentences, n=30")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sim = SimModel.from_pretrained(args.model or DEFAULT_MODEL_DIR)
    texts = [t for t in args.panel.read_text(encoding="utf-8").splitlines() if t.strip()]
    n = args.n
    if args.quick:
        texts, n = texts[::3], 30
    stats = {"off": [], "on": []}
    times = {"off": 0.0, "on": 0.0}
    for text in texts:
        lists = {}
        for mode, guard in (("off", None), ("on", DEFAULT_MIN_FLUENCY)):
            t0 = time.perf_counter()
            lists[mode] = sim.similar(text, n=n, k=args.k, seed=args.seed, min_fluency=guard)
            times[mode] += time.perf_counter() - t0
        print(f"\n== {text}")
        for (a, _), (b, _) in zip(lists["off"], lists["on"], strict=False):
            print(f"  {a:<40}\t{b}")
        for mode, results in lists.items():
            outs = [t for t, _ in results]
            if outs:
                flu = sim.fluency([text] * len(outs), outs)
                stats[mode] += [(repeats_more_than_source(text, o), f) for o, f in zip(outs, flu, strict=True)]
    summary = {"bench": "fluency_guard", "model": args.model or "embedded", "sentences": len(texts), "n": n,
               "k": args.k, "min_fluency": DEFAULT_MIN_FLUENCY}
    for mode in ("off", "on"):
        rep = np.array([r for r, _ in stats[mode]], dtype=float)
        flu = np.array([f for _, f in stats[mode]])
        summary[f"guard_{mode}_repeating_share"] = round(float(rep.mean()), 4)
        summary[f"guard_{mode}_below_min_fluency_share"] = round(float((flu < DEFAULT_MIN_FLUENCY).mean()), 4)
        summary[f"guard_{mode}_mean_logprob"] = round(float(flu.mean()), 4)
        summary[f"guard_{mode}_seconds"] = round(times[mode], 2)
    summary["ratio_time_on_off"] = round(times["on"] / times["off"], 3)
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
