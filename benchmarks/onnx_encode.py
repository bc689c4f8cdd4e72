"""CPU deployment: sentences/s of torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8, and `rosim sim` as a process.

Claims (issue 20): on this machine's CPU, `rosim export onnx`'s int8 model encodes at least 2x as
many sentences per second as the PyTorch model, with STS-B test Spearman within 0.5 points; and
`rosim sim A B --backend onnx` runs as a process in under 1.5 s (it never imports torch).

One run, same input: the embedded default model (6 x 384), exported into a temporary directory (or
``--export DIR``), encodes the distinct sentences of ../shared/data/sts-zh/STS-B/test.tsv (1,000 of
them; 200 with --quick) with ``batch_size=64`` (length-sorted batches, as ``SimModel.encode``), on 1
and then 2 intra-op threads for every backend; the backends take turns within each repeat so
background load hits them alike; medians of the repeats. Latency: the median time to encode one
sentence per call (1 thread), as a server answering single queries or `rosim sim` does. STS-B test Spearman comes from
``rosim.evaluation.evaluate`` (the code behind `rosim eval`) for each backend. Process wall time of
`rosim sim "今天天气不错" "今天天气很好"` per backend: median of fresh processes.
The load average at start and end is printed: wall-clock ratios are meaningful only on a quiet
machine. On a busy one, read the CPU-time figures: with one intra-op thread both torch and ONNX
Runtime compute in the calling thread, so its CPU time (``time.thread_time``) leaves out the time
spent waiting for a core; the same for the `rosim sim` processes (user + system time of the child).

    python benchmarks/onnx_encode.py --quick --export DIR   # 200 sentences, 200 STS-B pairs; about a minute
                                                             # on 2 quiet cores once DIR holds the export
    python benchmarks/onnx_encode.py              # 1,000 sentences, 3 repeats, full STS-B test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import STSB_TEST, emit, sts_sentences  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def ensure_export(directory: Path | None) -> tuple[Path, float | None]:
    """An export of the embedded model: ``directory`` if it already holds one, else made there (or in a temp dir)."""
    from rosim.inference.onnx_backend import MANIFEST_NAME, read_manifest
    from rosim.inference.sim_model import SimModel

    sim = SimModel.default()
    if directory is not None and (directory / MANIFEST_NAME).is_file():
        manifest = read_manifest(directory)
        if manifest["source"]["weights"] == sim.identity()["weights"] and "model.int8.onnx" in manifest["files"]:
            return directory, None
        raise SystemExit(f"{directory} holds an export of another model; give a new --export directory")
    from rosim.inference.onnx_export import export_onnx

    directory = directory or Path(tempfile.mkdtemp(prefix="rosim-onnx-bench-")) / "default-onnx"
    t0 = time.perf_counter()
    export_onnx(sim, directory)
    return directory, time.perf_counter() - t0


def sim_process_seconds(argv: list[str], repeats: int) -> tuple[float, float]:
    """Median wall time and CPU time (user + system, all threads) of fresh `rosim sim` processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-c", "import sys; from rosim.cli import main; sys.exit(main())", "sim",
           "今天天气不错", "今天天气很好", *argv]  # exactly what the `rosim` console script runs
    times, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return statistics.median(times), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--export", type=Path, default=None, help="reuse (or create) the default model's export here")
    ap.add_argument("--sentences", type=int, default=None, help="sentences to encode (default 1000; 200 quick)")
    ap.add_argument("--repeats", type=int, default=None, help="encode repeats per backend (default 3; 1 quick)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--single", type=int, default=None, help="sentences timed one per call (default 100; 30 quick)")
    ap.add_argument("--no-sts", action="store_true", help="skip the STS-B Spearman of each backend")
    args = ap.parse_args()
    n = args.sentences or (200 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 3)
    args.single = args.single or (20 if args.quick else 100)
    load_start = load_avg()

    import torch

    from rosim.inference.onnx_backend import OnnxEncoder
    from rosim.inference.sim_model import SimModel

    export_dir, export_s = ensure_export(args.export)
    texts = list(dict.fromkeys(sts_sentences()))[:n]
    sim = SimModel.default()
    results: dict[str, dict[int, float]] = {"torch_fp32": {}, "onnx_fp32": {}, "onnx_int8": {}}
    checks, single_ms, per_cpu_s = {}, {}, {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        encoders = {"torch_fp32": sim,
                    "onnx_fp32": OnnxEncoder(export_dir, precision="fp32", threads=threads),
                    "onnx_int8": OnnxEncoder(export_dir, precision="int8", threads=threads)}
        times: dict[str, list[float]] = {k: [] for k in encoders}
        cpu: dict[str, list[float]] = {k: [] for k in encoders}
        vectors = {}
        for enc in encoders.values():  # warm-up: first-call allocations and ORT's prepacking
            enc.encode(texts[:args.batch_size], batch_size=args.batch_size)
        for _ in range(repeats):
            for name, enc in encoders.items():
                t0, c0 = time.perf_counter(), time.thread_time()
                vectors[name] = enc.encode(texts, batch_size=args.batch_size)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
        for name in encoders:
            results[name][threads] = len(texts) / statistics.median(times[name])
            if threads == 1:  # one thread computes in the caller's thread: its CPU time ignores the wait for a core
                per_cpu_s[name] = len(texts) / statistics.median(cpu[name])
        if threads == 1:  # latency: one sentence per call (a server's single queries, `rosim sim`)
            for name, enc in encoders.items():
                one = []
                for text in texts[:args.single]:
                    t0 = time.perf_counter()
                    enc.encode(text)
                    one.append(time.perf_counter() - t0)
                single_ms[name] = 1000 * statistics.median(one)
            for name in ("onnx_fp32", "onnx_int8"):
                cos = (vectors[name] * vectors["torch_fp32"]).sum(1)
                checks[name] = {"min_cosine_vs_torch": round(float(cos.min()), 6),
                                "mean_cosine_vs_torch": round(float(cos.mean()), 6)}
        print(f"{threads} thread(s): " + ", ".join(f"{k} {v[threads]:.1f}/s" for k, v in results.items()),
              file=sys.stderr)

    spearman = None
    if not args.no_sts:
        from rosim.evaluation import evaluate
        from rosim.evaluation.sts import read_sts

        torch.set_num_threads(2)
        data = read_sts(STSB_TEST)
        if args.quick:
            data = dataclasses.replace(data, texts_a=data.texts_a[:200], texts_b=data.texts_b[:200],
                                       labels=data.labels[:200], line_numbers=data.line_numbers[:200])
        spearman = {}
        for name, enc in (("torch_fp32", sim), ("onnx_fp32", OnnxEncoder(export_dir, threads=2)),
                          ("onnx_int8", OnnxEncoder(export_dir, precision="int8", threads=2))):
            res = evaluate(enc, [data], poolings=["pooler"], whitens=["none"], batch_size=64,
                           show_progress_bar=False)
            spearman[name] = round(float(res[0].spearman), 2)
        print(f"STS-B test Spearman x100: {spearman}", file=sys.stderr)

    proc_repeats = 2 if args.quick else 5
    process_s = {
        "torch": sim_process_seconds([], proc_repeats),
        "onnx": sim_process_seconds(["--model", str(export_dir), "--backend", "onnx"], proc_repeats),
        "onnx-int8": sim_process_seconds(["--model", str(export_dir), "--backend", "onnx-int8"], proc_repeats),
    }
    record = {
        "bench": "onnx_encode",
        "model": "rosim-default (6x384)",
        "sentences": len(texts),
        "batch_size": args.batch_size,
        "repeats": repeats,
        **{f"{name}_per_s_{t}t": round(v, 1) for name, per in results.items() for t, v in per.items()},
        **{f"ratio_{name}_vs_torch_{t}t": round(results[name][t] / results["torch_fp32"][t], 2)
           for name in ("onnx_fp32", "onnx_int8") for t in (1, 2)},
        **{f"{name}_per_cpu_s_1t": round(v, 1) for name, v in per_cpu_s.items()},
        **{f"ratio_{name}_vs_torch_cpu_1t": round(per_cpu_s[name] / per_cpu_s["torch_fp32"], 2)
           for name in ("onnx_fp32", "onnx_int8")},
        **{f"{name}_single_ms_1t": round(v, 2) for name, v in single_ms.items()},
        **{f"ratio_{name}_vs_torch_single_1t": round(single_ms["torch_fp32"] / single_ms[name], 2)
           for name in ("onnx_fp32", "onnx_int8")},
        "vectors": checks,
        "stsb_test_spearman": spearman,
        "stsb_pairs": None if spearman is None else (200 if args.quick else 1361),
        "sim_process_s": {k: round(v[0], 3) for k, v in process_s.items()},
        "sim_process_cpu_s": {k: round(v[1], 3) for k, v in process_s.items()},
        "export_s": None if export_s is None else round(export_s, 1),
        "load_avg_start": load_start,
        "load_avg_end": load_avg(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    emit(record)


if __name__ == "__main__":
    main()
