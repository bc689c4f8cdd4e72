"""Copy a trained checkpoint into the package as the embedded default model (atomically), after
checking that it loads strictly and encodes. ``--fp16`` stores the weights in half precision (half
the size; they are loaded back into float32, so only the stored values are rounded).
Usage: python package.py CHECKPOINT_DIR DEST_DIR [--fp16]"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rosim.checkpoints.io import CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME, atomic_directory
from rosim.inference.sim_model import SimModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--fp16", action="store_true")
    args = ap.parse_args()
    src, dest = args.src, args.dest
    model = SimModel.from_pretrained(src)  # strict load: fails on anything missing or corrupt
    probe = ["今天天气不错", "广州和深圳哪个好？", "我不喜欢北京"]
    before = model.encode(probe)
    with atomic_directory(dest) as tmp:
        for name in (CONFIG_NAME, VOCAB_NAME):
            shutil.copy2(src / name, tmp / name)
        if args.fp16:
            state = {k: (v.half() if v.is_floating_point() else v).contiguous()
                     for k, v in load_file(src / WEIGHTS_NAME).items()}
            save_file(state, str(tmp / WEIGHTS_NAME))
        else:
            shutil.copy2(src / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        after = SimModel.from_pretrained(tmp).encode(probe)
        drift = float(np.abs(before - after).max())
        if drift > 5e-3:
            raise SystemExit(f"packaged vectors drift by {drift:.2e} from the checkpoint's")
    size = (dest / WEIGHTS_NAME).stat().st_size / 2**20
    print(f"packaged {src} -> {dest} ({model.model.num_parameters():,} parameters, {size:.1f} MiB, "
          f"max vector drift {drift:.1e}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
