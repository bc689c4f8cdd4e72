"""Vector search: build time, queries per second and recall@10, exact vs approximate (IVF, HNSW).

Claim: on 384-d sentence-vector-like data, the approximate indexes of `rosim index build --approx`
answer queries many times faster than the exact index, at a recall@10 (against exact search) that
this script measures.

Data (seeded): ``clustered`` (default) draws unit vectors around 1000 random centres (a mixture of
Gaussians, like sentence vectors, which gather by topic); queries come from the same mixture and
are not in the database. ``uniform`` draws i.i.d. Gaussian directions, the worst case for any
approximate index (no structure; every neighbour is almost as far as any other).

Runs every index through rosim's :class:`~rosim.index.VectorIndex` with its default parameters
(IVF: nlist about sqrt(n), nprobe = max(8, nlist/16); HNSW: M=32, efConstruction=40, efSearch=64).
The exact index searches by blockwise NumPy matrix products over the vectors faiss stores; the
script also times faiss' own flat scan (``IndexFlatIP.search``) on the same data as a reference.
Queries are searched as one batch (faiss spreads a batch over the cores); timings are medians of
repeats. The last stdout line is one JSON object.

    python benchmarks/search.py --quick      # 50k vectors, < 60 s on 2 cores
    python benchmarks/search.py              # 100k and 1M vectors (~1.5 GB per copy of 1M x 384)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import numpy as np


def make_data(n: int, dim: int, *, kind: str, seed: int, centres: np.ndarray | None, chunk: int = 100_000):
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            x = centres[rng.integers(0, len(centres), m)] + x * np.float32(1.0 / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    k = exact_ids.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / k for a, e in zip(approx_ids, exact_ids, strict=True)]))


def run_size(n: int, args, centres) -> dict:
    from rosim.index import VectorIndex

    dim, k = args.dim, 10
    db = make_data(n, dim, kind=args.data, seed=args.seed, centres=centres)
    queries = make_data(args.queries, dim, kind=args.data, seed=args.seed + 1, centres=centres)
    texts = [""] * n  # the texts are irrelevant here; the index stores one per vector
    row: dict = {"n": n, "queries": args.queries}

    def build(kind):
        index = VectorIndex(dim, kind=kind)
        index.add(texts, db)
        return index

    t_build, flat = timed(lambda: build("exact"), 1)
    t_search, (_, exact_ids) = timed(lambda: flat.search(queries, k), args.repeats)
    row["exact"] = {"build_s": round(t_build, 3), "qps": round(args.queries / t_search, 1)}
    if args.faiss_flat:  # reference: faiss' own exhaustive scan over the same stored vectors
        t_ff, (_, ff_ids) = timed(lambda: flat._index.search(queries, k), args.repeats)
        row["faiss_flat"] = {"qps": round(args.queries / t_ff, 1), "agrees_with_exact": recall_at(ff_ids, exact_ids)}
    flat = None
    gc.collect()
    for kind in args.approx:
        t_build, index = timed(lambda kind=kind: build(kind), 1)
        t_search, (_, ids) = timed(lambda index=index: index.search(queries, k), args.repeats)
        params = {"nlist": index.nlist, "nprobe": index._nprobe()} if kind == "ivf" else {
            "m": index.hnsw_m, "ef_construction": index.ef_construction, "ef_search": index.ef_search}
        row[kind] = {"build_s": round(t_build, 3), "qps": round(args.queries / t_search, 1),
                     "recall_at_10": round(recall_at(ids, exact_ids), 4), "params": params}
        index = None
        gc.collect()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="50k vectors, 200 queries (< 60 s on 2 cores)")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated database sizes (default 100000,1000000; quick 50000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=None, help="queries per size (default 1000; quick 200)")
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--approx", type=lambda s: s.split(","), default=["ivf", "hnsw"], help="ivf,hnsw")
    p.add_argument("--headline", choices=["ivf", "hnsw"], default="hnsw",
                   help="which approximate index the JSON's qps_approx / recall_at_10 report")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-faiss-flat", dest="faiss_flat", action="store_false",
                   help="skip timing faiss' own flat scan (the reference for the exact index)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.sizes = args.sizes or ([50_000] if args.quick else [100_000, 1_000_000])
    args.queries = args.queries or (200 if args.quick else 1000)
    if args.headline not in args.approx:
        args.headline = args.approx[0]

    import faiss

    rng = np.random.default_rng(args.seed + 7)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    rows = []
    for n in args.sizes:
        row = run_size(n, args, centres)
        rows.append(row)
        line = f"n={n:>9,}  exact: build {row['exact']['build_s']:7.2f} s  {row['exact']['qps']:9.1f} q/s"
        if "faiss_flat" in row:
            line += f"  | faiss IndexFlatIP.search {row['faiss_flat']['qps']:8.1f} q/s"
        print(line, flush=True)
        for kind in args.approx:
            r = row[kind]
            print(f"{'':12} {kind:>5}: build {r['build_s']:7.2f} s  {r['qps']:9.1f} q/s  recall@10 {r['recall_at_10']:.3f}"
                  f"  speed-up x{r['qps'] / row['exact']['qps']:.1f}  {r['params']}", flush=True)
    last = rows[-1]
    head = last[args.headline]
    result = {
        "bench": "search", "data": args.data, "dim": args.dim, "n": last["n"], "queries": args.queries,
        "approx": args.headline, "recall_at_10": head["recall_at_10"], "qps_exact": last["exact"]["qps"],
        "qps_approx": head["qps"], "ratio": round(head["qps"] / last["exact"]["qps"], 2),
        "build_s_exact": last["exact"]["build_s"], "build_s_approx": head["build_s"],
        "sizes": rows, "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
