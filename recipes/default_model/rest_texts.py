"""The texts of sentences.txt that the first two teacher passes did not embed, shuffled (seed 0) so
that a partial teacher run is a random subset; writes DATA_DIR/distill3_texts.txt.
Usage: python recipes/default_model/rest_texts.py DATA_DIR"""

from __future__ import annotations

import random
import sys
from pathlib import Path


def main() -> None:
    d = Path(sys.argv[1])
    done = set()
    for name in ("distill_texts.txt", "distill2_texts.txt"):
        done |= set((d / name).read_text(encoding="utf-8").splitlines())
    rest = list(dict.fromkeys(t.strip() for t in (d / "sentences.txt").read_text(encoding="utf-8").splitlines()
                              if t.strip() and t.strip() not in done))
    random.Random(0).shuffle(rest)
    (d / "distill3_texts.txt").write_text("\n".join(rest) + "\n", encoding="utf-8")
    print(f"{len(done)} texts already embedded, {len(rest)} to go -> {d / 'distill3_texts.txt'}")


if __name__ == "__main__":
    main()
