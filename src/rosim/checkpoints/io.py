"""rosim's own checkpoint format: a directory with ``config.json``, ``model.safetensors``, ``vocab.txt``.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place.
Loading is strict: missing or unexpected tensors and shape mismatches raise a
:class:`~rosim.errors.CheckpointError` naming them; a deliberate partial load must be asked for with
``allow_missing`` (prefixes such as ``"pooler."``) and is reported in the returned :class:`LoadReport`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rosim.errors import CheckpointError, InputError
from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
from rosim.textio import atomic_directory  # noqa: F401  (re-exported: checkpoints are written with it)
from rosim.tokenization.tokenizer import CharTokenizer

CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME = "config.json", "model.safetensors", "vocab.txt"


@dataclass
class LoadReport:
    """What a load did: tensors left at their initial values (only when asked for), checkpoint
    tensors the model does not use (heads it lacks, optimizer state), and other remarks."""

    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"initialised randomly (not in checkpoint): {', '.join(self.missing)}")
        if self.ignored:
            parts.append(f"ignored (not used by the model): {', '.join(self.ignored)}")
        parts.extend(self.notes)
        return "; ".join(parts) or "all tensors loaded"


def load_state_strict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    source: str = "checkpoint",
) -> LoadReport:
    """Load ``state`` into ``model``; any difference not explicitly allowed is an error that names it."""
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    bad_missing = [k for k in missing if not k.startswith(allow_missing) or not allow_missing]
    bad_unexpected = [k for k in unexpected if not k.startswith(allow_unexpected) or not allow_unexpected]
    problems = []
    if bad_missing:
        problems.append(f"missing tensors {bad_missing}")
    if bad_unexpected:
        problems.append(f"unexpected tensors {bad_unexpected}")
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        problems.append("shape mismatches (does config.json match the weights?) " + "; ".join(shapes))
    if problems:
        hint = " (pass allow_missing=('pooler.',) for a deliberate partial load)" if bad_missing else ""
        raise CheckpointError(f"{source}: " + "; ".join(problems) + hint)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return LoadReport(missing=missing, ignored=unexpected)


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order.

    Stored in a checkpoint's safetensors metadata (``weights_sha256``) and checked at load, so flipped
    bytes in the file are an error rather than garbage vectors; also the model's identity for indexes.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """A checkpoint whose weights hold NaN or infinity is corrupt: name the tensors."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: tensors with NaN or infinite values {bad[:5]}{' …' if len(bad) > 5 else ''}: "
                              "the checkpoint is corrupt")


def build_model(
    config: RoFormerSimConfig,
    state: Mapping[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = (),
    source: str = "checkpoint",
) -> tuple[RoFormerSim, LoadReport]:
    """Build a model for ``config`` and load ``state`` strictly (see :func:`load_state_strict`).

    When ``state`` holds every tensor, the model is allocated without random initialisation
    (initialising a base-size model costs seconds and every value would be overwritten anyway).
    """
    with torch.device("meta"):
        skeleton = RoFormerSim(config)
    if all(k in state for k in skeleton.state_dict()):
        model = skeleton.to_empty(device="cpu")
    else:  # a deliberate partial load: the missing tensors keep their initial values
        model = RoFormerSim(config)
    report = load_state_strict(model, state, allow_missing=allow_missing, source=source)
    return model, report


def save_checkpoint(
    directory: str | os.PathLike,
    model: RoFormerSim,
    tokenizer: CharTokenizer,
    *,
    metadata: dict | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``vocab.txt`` atomically."""
    from safetensors.torch import save_file

    if len(tokenizer) != model.config.vocab_size:
        raise InputError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(model.config.to_json(), encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "rosim": json.dumps(metadata or {}),
                                                            "weights_sha256": weights_digest(state)})
        tokenizer.save(tmp / VOCAB_NAME)
    return Path(directory)


def read_json_object(path: str | os.PathLike) -> dict:
    """A checkpoint's JSON file (a model config) as a dict, or a CheckpointError that names the file
    and what is wrong with it: missing, unreadable, not UTF-8, not JSON, or not a JSON object."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(directory: str | os.PathLike) -> RoFormerSimConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a rosim checkpoint: {CONFIG_NAME} not found")
    data = read_json_object(path)
    try:
        return RoFormerSimConfig.from_dict(data)
    except InputError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def read_safetensors(path: str | os.PathLike, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupt file raises a CheckpointError, and so do
    weights that no longer match the ``weights_sha256`` that rosim stored when it wrote them."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            recorded = (f.metadata() or {}).get("weights_sha256")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt (not a valid safetensors file): {exc}") from None
    if verify and recorded and weights_digest(state) != recorded:
        raise CheckpointError(f"{path}: the weights do not match the checksum stored with them: the file is "
                              "corrupt (restore it from a copy or convert/train it again)")
    return state


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    allow_missing: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
) -> tuple[RoFormerSim, CharTokenizer, LoadReport]:
    """Load a model and its tokenizer from a rosim checkpoint directory."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; a checkpoint is a directory with {CONFIG_NAME}, {WEIGHTS_NAME}, {VOCAB_NAME}")
    config = read_config(directory)
    try:
        tokenizer = CharTokenizer.from_file(directory / VOCAB_NAME)
    except (InputError, FileNotFoundError) as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(
            f"{directory}: vocab.txt has {len(tokenizer)} tokens but config.json says vocab_size={config.vocab_size}"
        )
    state = read_safetensors(directory / WEIGHTS_NAME)
    check_finite(state, str(directory / WEIGHTS_NAME))
    model, report = build_model(config, state, allow_missing=allow_missing, source=str(directory / WEIGHTS_NAME))
    model.to(map_location).eval()
    return model, tokenizer, report
