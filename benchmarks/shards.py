"""Corpora past one machine: sharded encoding and an index built from shards, at 10k, 100k and 1M vectors.

Two measurements, each in its own child process (so its VmHWM is that step's peak memory):

* **encode**: ``rosim index encode`` on the embedded default model over the first N sentences of
  the STS-B/LCQMC test files, as 1 worker with 2 threads vs 2 workers (ranks 0 and 1 of 2) with 1
  thread each, started together: sentences/s of the whole job and each worker's peak RSS.
* **merge**: ``build_from_shards`` (IVF and IVF-PQ, in memory and with the cells on disk; exact for
  reference) over synthetic 384-d unit
  vectors written as 1 shard or as 2 shards (the vectors stand in for a model: clustered around
  1000 random centres, as sentence vectors gather by topic): build seconds, peak RSS, recall@10
  against exact search over 1000 held-out queries, and queries/s (one batch, 2 threads). The peak
  RSS of an on-disk build counts the pages of its memory-mapped files that were resident (file
  cache the kernel can drop), and its queries/s is on a warm page cache (the file was just written).
* **load**: what a search machine holds: each index saved, then loaded in a fresh process
  (``verify=False``), 1,000 queries answered and their top texts read: load seconds and memory.

Usage: python benchmarks/shards.py [--sizes 10000,100000,1000000] [--encode 2000] [--kinds ivf,ivfpq]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, emit  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
RUN_CLI = "import sys; from rosim.cli import main; sys.exit(main())"


class TableEncoder:
    """Vectors looked up by the line's integer: synthetic data through the real shard writer."""

    def __init__(self, path: str, dim: int):
        self.table = np.load(path, mmap_mode="r")
        self.dim = dim

    def identity(self):
        return {"name": "synthetic", "weights": "table", "fingerprint": "table", "dim": self.dim, "max_length": 0}

    def encode(self, texts, **kwargs):
        return np.asarray(self.table[[int(t) for t in texts]])


def make_data(n: int, dim: int, centres: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def peak_rss_mib() -> float:
    """This process' own peak RSS: VmHWM starts afresh at exec, while Linux carries ``ru_maxrss`` over
    from the forking parent (which here holds the whole synthetic table)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_now_mib() -> dict:
    """Resident memory now, split into anonymous (the process' own) and file-backed (memory-mapped
    files: page cache the kernel can drop) pages."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[f"Rss{k.capitalize()}"].split()[0]) / 1024, 1) for k in ("anon", "file")}


def child(args) -> None:
    """One step in this process; prints a JSON line with the step's result and peak RSS."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from rosim.index import build_from_shards, encode_shards

    if args.step == "write":  # synthetic vectors as `shards` shards
        enc = TableEncoder(args.table, args.dim)
        for rank in range(args.shards):
            encode_shards(enc, args.corpus, args.out, shard_size=-(-args.n // args.shards), rank=rank,
                          world_size=args.shards, pooling=None, batch_size=4096, show_progress_bar=False)
        out = {}
    elif args.step == "merge":
        kind, _, disk = args.kind.partition("+")  # "ivfpq+disk": cells merged into an on-disk file
        t0 = time.perf_counter()
        index = build_from_shards(args.out, kind=kind, verify=True,
                                  on_disk=Path(args.out).with_name("ondisk-index") if disk else None)
        build = time.perf_counter() - t0
        queries = np.load(args.queries)
        exact = np.load(args.exact_ids)
        index.search(queries[:10], 10)
        t0 = time.perf_counter()
        _, ids = index.search(queries, 10)
        qps = len(queries) / (time.perf_counter() - t0)
        recall = float(np.mean([len(set(a[a >= 0]) & set(e)) / 10 for a, e in zip(ids, exact, strict=True)]))
        out = {"build_s": round(build, 2), "qps": round(qps, 1), "recall_at_10": round(recall, 4),
               "nlist": index.nlist, "pq_m": index.pq_m if kind == "ivfpq" else None}
        if args.save and not disk:
            index.save(args.save)
    elif args.step == "load":  # what a search machine holds: the saved index loaded, 1,000 queries answered
        from rosim.index import VectorIndex

        t0 = time.perf_counter()
        index = VectorIndex.load(args.out, verify=False)
        load = time.perf_counter() - t0
        _, ids = index.search(np.load(args.queries), 10)
        hits = [index.texts[int(j)] for j in ids[:, 0]]
        out = {"load_s": round(load, 2), "hits": len(hits)}
    out["peak_rss_mib"] = peak_rss_mib()
    out["rss_at_end_mib"] = rss_now_mib()
    print(json.dumps(out))


def run_child(*argv, threads: int = 2) -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, __file__, "--child", *map(str, argv)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def sentences(count: int) -> list[str]:
    seen: dict[str, None] = {}
    for path in sorted((SHARED / "data" / "sts-zh").rglob("*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines():
            for text in line.split("\t")[:2]:
                if text.strip():
                    seen.setdefault(text.strip(), None)
            if len(seen) >= count:
                return list(seen)[:count]
    return list(seen)


def encode_scaling(count: int, tmp: Path) -> dict:
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(sentences(count)) + "\n", encoding="utf-8")
    rows = {}
    for workers, threads in ((1, 2), (2, 1)):
        out = tmp / f"enc{workers}"
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", RUN_CLI, "index", "encode", str(corpus), "-o", str(out),
                                   "--shard-size", "250", "--rank", str(r), "--world-size", str(workers), "-q"],
                                  env=env) for r in range(workers)]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"encode worker failed with {p.returncode}")
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rows[f"{workers}x{threads}"] = {"wall_s": round(wall, 1), "sentences_per_s": round(count / wall, 1),
                                        "peak_rss_mib_any_so_far": round(peak, 1)}
        print(f"encode {count} sentences, {workers} worker(s) x {threads} thread(s): {wall:6.1f} s "
              f"{count / wall:7.1f} sentences/s", flush=True)
    rows["speedup_2_workers"] = round(rows["2x1"]["sentences_per_s"] / rows["1x2"]["sentences_per_s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--step"), ap.add_argument("--table"), ap.add_argument("--corpus"), ap.add_argument("--out")
    ap.add_argument("--queries"), ap.add_argument("--exact-ids"), ap.add_argument("--kind"), ap.add_argument("--save")
    ap.add_argument("--n", type=int), ap.add_argument("--shards", type=int)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=["ivf", "ivfpq", "ivf+disk", "ivfpq+disk"],
                    help="'+disk': the cells merged into an on-disk file (index merge --on-disk)")
    ap.add_argument("--encode", type=int, default=2000, help="sentences for the encode scaling (0: skip)")
    ap.add_argument("--tmp", default=None, help="scratch directory (needs ~2 x 1.6 GB per 1M vectors)")
    args = ap.parse_args()
    if args.child:
        return child(args)
    import torch

    torch.set_num_threads(2)
    record: dict = {"bench": "shards", "dim": args.dim, "threads": 2}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_s:
        tmp = Path(tmp_s)
        if args.encode:
            record["encode"] = encode_scaling(args.encode, tmp)
        rng = np.random.default_rng(7)
        centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        for n in args.sizes:
            table, corpus = tmp / "table.npy", tmp / "ids.txt"
            np.save(table, make_data(n, args.dim, centres, seed=n))
            corpus.write_text("".join(f"{i}\n" for i in range(n)), encoding="utf-8")
            queries = make_data(1000, args.dim, centres, seed=1)
            np.save(tmp / "q.npy", queries)
            from rosim.index.vector_index import exact_topk

            np.save(tmp / "exact.npy", exact_topk(np.load(table), queries, 10)[1])
            for shards in (1, 2):
                out = tmp / f"shards{shards}"
                run_child("--step", "write", "--table", table, "--corpus", corpus, "--out", out, "--n", n,
                          "--shards", shards, "--dim", args.dim)
                for kind in ["exact", *args.kinds]:
                    saved = tmp / "saved-index"
                    r = run_child("--step", "merge", "--out", out, "--kind", kind, "--queries", tmp / "q.npy",
                                  "--exact-ids", tmp / "exact.npy", "--dim", args.dim, "--save", saved)
                    index_dir = out.with_name("ondisk-index") if kind.endswith("+disk") else saved
                    r["load"] = run_child("--step", "load", "--out", index_dir, "--queries", tmp / "q.npy")
                    shutil.rmtree(saved, ignore_errors=True)
                    record[f"n{n}_{shards}shard_{kind}"] = r
                    print(f"n={n:>9,} {shards} shard(s) {kind:>10}: build {r['build_s']:6.2f} s  peak {r['peak_rss_mib']:7.1f} MiB"
                          f" (end: anon {r['rss_at_end_mib']['anon']:7.1f}, file {r['rss_at_end_mib']['file']:7.1f})"
                          f"  {r['qps']:9.1f} q/s  recall@10 {r['recall_at_10']:.3f}  nlist={r['nlist']} pq_m={r['pq_m']}",
                          flush=True)
                    print(f"    load + 1,000 queries + their texts: {r['load']['load_s']:6.2f} s  peak "
                          f"{r['load']['peak_rss_mib']:7.1f} MiB (end: anon {r['load']['rss_at_end_mib']['anon']:7.1f}, "
                          f"file {r['load']['rss_at_end_mib']['file']:7.1f})", flush=True)
                shutil.rmtree(out)
                shutil.rmtree(out.with_name("ondisk-index"), ignore_errors=True)
    emit(record)


if __name__ == "__main__":
    main()
