"""Throughput of the common batch job: `rosim similar --file questions.txt -o out.jsonl` (n=100, k=20).

The questions are the first N distinct sentences of LCQMC valid (real user questions, 5–25
characters). Each checkout runs as its own process (`python -m rosim.cli` under its PYTHONPATH)
with the same thread count, back to back; reported: wall seconds, sentences/s, the process's peak
resident memory (ru_maxrss of the child), and the ratio new/old when --old-src is given.

Usage: python benchmarks/similar_file.py [--count 1000] [--threads 2] [--old-src /path/to/old/src]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, emit  # noqa: E402

LCQMC_VALID = SHARED / "data" / "sts-zh" / "LCQMC" / "valid.tsv"


def questions(count: int) -> list[str]:
    seen: dict[str, None] = {}
    for line in LCQMC_VALID.read_text(encoding="utf-8").splitlines():
        for text in line.split("\t")[:2]:
            if text.strip():
                seen.setdefault(text.strip(), None)
        if len(seen) >= count:
            break
    return list(seen)[:count]


# runs its arguments as a command and prints that command's peak RSS (KiB) last on stderr: a
# process' RUSAGE_CHILDREN keeps the largest child it ever had, so each run needs its own parent
PEAK_OF_CHILD = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run(src: Path, qfile: Path, out: Path, threads: int, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", "import sys; from rosim.cli import main; sys.exit(main())", "similar",
           "--file", str(qfile), "-o", str(out), "-n", "100", "-k", "20", "--seed", "0", "-q", *extra]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *cmd], env=env, check=True, stderr=subprocess.PIPE,
                         text=True)
    wall = time.perf_counter() - t0
    peak_kib = int(res.stderr.strip().splitlines()[-1])
    lines = out.read_text(encoding="utf-8").splitlines()
    return {"wall_s": round(wall, 1), "sentences_per_s": round(len(lines) / wall, 3),
            "peak_rss_mib": round(peak_kib / 1024, 1), "lines": len(lines)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old-src", type=Path, help="src/ of an older checkout to compare with (run first)")
    ap.add_argument("--old-args", default="--batch 8", help="extra arguments for the old checkout")
    args = ap.parse_args()
    qs = questions(args.count)
    record = {"bench": "similar_file", "count": len(qs), "threads": args.threads, "n": 100, "k": 20}
    with tempfile.TemporaryDirectory() as tmp:
        qfile = Path(tmp) / "q.txt"
        qfile.write_text("\n".join(qs) + "\n", encoding="utf-8")
        if args.old_src:
            record["old"] = run(args.old_src, qfile, Path(tmp) / "old.jsonl", args.threads, args.old_args.split())
            print(f"old: {record['old']}", flush=True)
        new_src = Path(__file__).resolve().parents[1] / "src"
        record["new"] = run(new_src, qfile, Path(tmp) / "new.jsonl", args.threads, [])
        print(f"new: {record['new']}", flush=True)
    if args.old_src:
        record["speedup"] = round(record["new"]["sentences_per_s"] / record["old"]["sentences_per_s"], 2)
    emit(record)


if __name__ == "__main__":
    main()
