"""Key the teacher vectors by the texts the trainer will ask for (texts cut at maxlen * 1.2).

The teacher embeds each sentence whole; the student sees the cut text. Usage:
python recipes/default_model/rekey_teacher.py IN.npz [IN2.npz ...] OUT.npz --maxlen 32
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from rosim.training.data import cut_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path, nargs="+")
    ap.add_argument("out", type=Path)
    ap.add_argument("--maxlen", type=int, default=32)
    args = ap.parse_args()
    texts, parts = [], []
    for src in args.src:
        with np.load(src, allow_pickle=False) as data:
            texts += data["texts"].tolist()
            parts.append(data["vectors"])
    vectors = np.concatenate(parts)
    keys: dict[str, int] = {}
    for i, t in enumerate(texts):
        keys.setdefault(cut_text(t, args.maxlen), i)
        keys.setdefault(t, i)
    names = list(keys)
    tmp = args.out.with_name(args.out.stem + ".tmp.npz")
    np.savez(tmp, texts=np.array(names, dtype=str), vectors=vectors[[keys[k] for k in names]])
    os.replace(tmp, args.out)
    print(f"{len(texts)} texts -> {len(names)} keys in {args.out}")


if __name__ == "__main__":
    main()
