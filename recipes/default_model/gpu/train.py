"""The default model's heavy training on one GPU, inside a fixed time budget (one device call).

1. unpack .gpu/ (made by prep.py): data files, teacher vectors (int8 -> float32, keyed by the cut
   texts the trainer asks for) and jieba;
2. stage 1 (stage1.toml) for ``--stage1-share`` of the budget (the trainer's ``time_limit_s``);
3. stage 2 (stage2.toml), its step count sized from stage 1's measured speed so that its linear
   schedule ends inside the budget (``time_limit_s`` as a safety net);
4. STS-B *valid* Spearman (pooler, cosine) after each stage, as a progress check;
5. the final model to OUT: weights in shards under 15 MiB (the device's file-size limit) and
   config, vocabulary, logs and a summary in one tar. ``merge.py`` puts them back together.

Usage (repo root): python recipes/default_model/gpu/train.py --budget 430 --out $OUT [--tiny]
``--tiny`` shrinks the model and steps for a CPU smoke test of the whole path.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
G = ROOT / ".gpu"
WORK = Path("/tmp/rosim_gpu")  # unpacked data, the stage configs and the runs (nothing of it travels back)
SHARD_BYTES = 15 * 2**20


def unpack() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    for name in ("stage1.toml", "stage2.toml"):
        shutil.copy(HERE / name, WORK / name)
    shutil.copy(G / "vocab.txt", WORK / "vocab.txt")
    site = Path("/tmp/rosim_site")
    if not (site / "jieba").is_dir():
        site.mkdir(parents=True, exist_ok=True)
        with tarfile.open(G / "jieba.tgz") as tar:
            tar.extractall(site, filter="data")
    sys.path.insert(0, str(site))
    for name in ("pairs.jsonl", "distill.jsonl", "pd_adjacent.jsonl"):
        with gzip.open(G / f"{name}.gz", "rb") as f, open(WORK / name, "wb") as g:
            shutil.copyfileobj(f, g)
    from rosim.training.data import cut_text

    sys.path.insert(0, str(HERE))
    from prep import dequantize

    with np.load(G / "teacher_q8.npz") as d:
        texts = bytes(d["texts_utf8"]).decode("utf-8").split("\n")
        vectors = dequantize(d)
    keys: dict[str, int] = {}
    for i, t in enumerate(texts):
        keys.setdefault(cut_text(t, 32), i)
        keys.setdefault(t, i)
    names = list(keys)
    np.savez(WORK / "teacher_keyed.npz", texts=np.array(names, dtype=str), vectors=vectors[[keys[k] for k in names]])
    print(f"unpacked: {len(texts)} teacher texts -> {len(names)} keys", flush=True)


def valid_spearman(final: Path) -> float:
    from rosim.evaluation import evaluate
    from rosim.inference.sim_model import SimModel

    model = SimModel.from_pretrained(final, device="cuda" if _cuda() else "cpu")
    return evaluate(model, [G / "stsb_valid.tsv"], batch_size=256)[0].spearman


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_stage(toml: str, stage: str, *, steps: int, time_limit: float, tiny: bool) -> tuple[Path, dict]:
    from rosim.training.config import load_config
    from rosim.training.trainer import Trainer

    overrides = {"train.steps": steps, "train.time_limit_s": time_limit}
    if tiny:
        overrides.update({"train.batch_size": 16, "train.data_workers": 2, "train.log_every": 5,
                          "train.save_every": 10, "train.warmup_steps": 2})
    else:
        overrides["train.data_workers"] = max(1, min(14, (os.cpu_count() or 2) - 2))  # 14 on the 16-core GPU machine
    cfg = load_config(WORK / toml, overrides)
    if tiny and cfg.model.config:
        cfg.model.config.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    marks: list[tuple[int, float]] = []  # (step, time) at every logged step: the speed without start-up
    trainer = Trainer(cfg, stage, overwrite=True, quiet=True,
                      on_step=lambda step, _: marks.append((step, time.perf_counter())))
    t0 = time.perf_counter()
    try:
        final = trainer.train()
        done = trainer.step
    finally:
        trainer.close()
    secs = time.perf_counter() - t0
    log = [json.loads(x) for x in (Path(cfg.train.out_dir) / "log.jsonl").read_text().splitlines()]
    rate = (marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1]) if len(marks) > 2 else done / secs
    info = {"steps": done, "seconds": round(secs, 1), "steps_per_s": round(rate, 3),
            "startup_s": round(marks[0][1] - t0 - marks[0][0] / rate, 1) if marks else None,
            "last_log": log[-1] if log else None}
    print(stage, json.dumps(info), flush=True)
    return final, info


def export(final: Path, out: Path, summary: dict) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(final / "model.safetensors")
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    for i, shard in enumerate(shards):
        save_file(shard, str(out / f"weights-{i}.safetensors"))
    (WORK / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    with tarfile.open(out / "meta.tgz", "w:gz") as tar:
        for name in ("config.json", "vocab.txt"):
            tar.add(final / name, arcname=name)
        for stage in ("stage1", "stage2"):
            if (WORK / "runs" / stage / "log.jsonl").is_file():
                tar.add(WORK / "runs" / stage / "log.jsonl", arcname=f"{stage}_log.jsonl")
        tar.add(WORK / "summary.json", arcname="summary.json")
    print(f"exported {len(shards)} weight shards to {out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, required=True, help="seconds for both stages together")
    ap.add_argument("--stage1-share", type=float, default=0.33)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    unpack()
    import torch

    summary: dict = {"cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                     "torch": torch.__version__}
    print(json.dumps(summary), flush=True)
    budget = args.budget - (time.perf_counter() - t_start)
    s1_time = budget * args.stage1_share
    final1, summary["stage1"] = run_stage("stage1.toml", "stage1", steps=100000 if not args.tiny else 40,
                                          time_limit=s1_time, tiny=args.tiny)
    summary["stage1"]["valid_spearman"] = valid_spearman(final1)
    print("stage1 valid", summary["stage1"]["valid_spearman"], flush=True)
    left = args.budget - (time.perf_counter() - t_start)
    startup = summary["stage1"]["startup_s"] or 0.0
    steps2 = max(int(summary["stage1"]["steps_per_s"] * (left - startup - 5) * 0.96), 20)
    try:
        final2, summary["stage2"] = run_stage("stage2.toml", "stage2", steps=steps2, time_limit=left, tiny=args.tiny)
        summary["stage2"]["planned_steps"] = steps2
        summary["stage2"]["valid_spearman"] = valid_spearman(final2)
        print("stage2 valid", summary["stage2"]["valid_spearman"], flush=True)
    except Exception as exc:  # bring stage 1's model back rather than nothing
        import traceback

        traceback.print_exc()
        summary["stage2"] = {"failed": repr(exc)}
        final2 = final1
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    export(final2, args.out, summary)


if __name__ == "__main__":
    main()
