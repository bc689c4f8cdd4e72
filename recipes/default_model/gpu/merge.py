"""Put the GPU run's output back together as a rosim checkpoint (strictly loaded and checked).

Usage: python recipes/default_model/gpu/merge.py DEVICE_OUT_DIR CHECKPOINT_DIR [--logs LOG_DIR]
DEVICE_OUT_DIR holds weights-*.safetensors and meta.tgz (see train.py); the logs and the summary
go to LOG_DIR (default: recipes/default_model/logs/gpu).
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from rosim.checkpoints.io import atomic_directory
from rosim.inference.sim_model import SimModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--logs", type=Path, default=Path(__file__).resolve().parents[1] / "logs" / "gpu")
    args = ap.parse_args()
    state = {}
    for shard in sorted(args.src.glob("weights-*.safetensors")):
        part = load_file(shard)
        if state.keys() & part.keys():
            raise SystemExit(f"{shard}: tensors repeated across shards")
        state.update(part)
    if not state:
        raise SystemExit(f"no weights-*.safetensors in {args.src}")
    with tempfile.TemporaryDirectory() as tmp_meta:
        with tarfile.open(args.src / "meta.tgz") as tar:
            tar.extractall(tmp_meta, filter="data")
        meta = Path(tmp_meta)
        with atomic_directory(args.dest) as tmp:
            shutil.copy2(meta / "config.json", tmp / "config.json")
            shutil.copy2(meta / "vocab.txt", tmp / "vocab.txt")
            save_file(state, str(tmp / "model.safetensors"))
            model = SimModel.from_pretrained(tmp)  # strict: fails on a missing or extra tensor
            model.encode(["今天天气不错"])
        args.logs.mkdir(parents=True, exist_ok=True)
        for name in ("stage1_log.jsonl", "stage2_log.jsonl", "summary.json"):
            shutil.copy2(meta / name, args.logs / name)
    print(f"merged {len(state)} tensors into {args.dest}; logs in {args.logs}")


if __name__ == "__main__":
    main()
