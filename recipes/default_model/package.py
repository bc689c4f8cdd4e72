"""Copy a trained checkpoint into the package as the embedded default model (atomically), after
checking that it loads strictly and encodes. Usage: python package.py CHECKPOINT_DIR DEST_DIR"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from rosim.checkpoints.io import CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME, atomic_directory
from rosim.inference.sim_model import SimModel


def main() -> None:
    src, dest = Path(sys.argv[1]), Path(sys.argv[2])
    model = SimModel.from_pretrained(src)  # strict load: fails on anything missing or corrupt
    model.encode(["今天天气不错"])
    with atomic_directory(dest) as tmp:
        for name in (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME):
            shutil.copy2(src / name, tmp / name)
    size = (dest / WEIGHTS_NAME).stat().st_size / 2**20
    print(f"packaged {src} -> {dest} ({model.model.num_parameters():,} parameters, {size:.1f} MiB)")


if __name__ == "__main__":
    main()
