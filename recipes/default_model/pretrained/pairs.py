"""Human paraphrase pairs for training the pretrained-start default model (never a test split).

* positive pairs of LCQMC, BQ and ATEC valid: only the half whose key (a hash of the pair) is even;
  the other half stays held out, so the shared valid splits still measure the model;
* STS-B train pairs scored >= 4.

Writes {"text_a", "text_b", "source"} lines to OUT/pairs.jsonl and the held-out halves of the
valid splits to OUT/heldout/{LCQMC,BQ,ATEC}.tsv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "sts-zh"


def rows(path: Path):
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].strip() and parts[1].strip():
            yield parts[0].strip(), parts[1].strip(), float(parts[2])


def training_half(a: str, b: str) -> bool:
    return hashlib.sha1(f"{a}\t{b}".encode()).digest()[0] % 2 == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/default_model_e5/data"))
    ap.add_argument("--shared", type=Path, default=SHARED)
    args = ap.parse_args()
    (args.out / "heldout").mkdir(parents=True, exist_ok=True)
    pairs, counts = [], {}
    for name in ("LCQMC", "BQ", "ATEC"):
        held = []
        for a, b, label in rows(args.shared / name / "valid.tsv"):
            if training_half(a, b):
                if label == 1 and a != b:
                    pairs.append({"text_a": a, "text_b": b, "source": name.lower()})
                    counts[name.lower()] = counts.get(name.lower(), 0) + 1
            else:
                held.append(f"{a}\t{b}\t{int(label)}\n")
        (args.out / "heldout" / f"{name}.tsv").write_text("".join(held), encoding="utf-8")
        counts[f"{name.lower()}_heldout_pairs"] = len(held)
    for a, b, score in rows(args.shared / "STS-B" / "train.tsv"):
        if score >= 4 and a != b:
            pairs.append({"text_a": a, "text_b": b, "source": "stsb_train"})
            counts["stsb_train"] = counts.get("stsb_train", 0) + 1
    random.Random(0).shuffle(pairs)
    tmp = args.out / "pairs.jsonl.tmp"
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(args.out / "pairs.jsonl")
    counts["total"] = len(pairs)
    (args.out / "counts.json").write_text(json.dumps(counts, indent=2))
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
