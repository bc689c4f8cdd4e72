"""Saving and loading a UniVAE: a rosim checkpoint of the backbone plus ``univae.json`` (the
:class:`~rosim.univae.config.UniVAEConfig`) and ``univae.safetensors`` (the latent projections)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rosim.errors import CheckpointError, InputError
from rosim.univae.config import UniVAEConfig

UNIVAE_CONFIG_NAME, UNIVAE_WEIGHTS_NAME = "univae.json", "univae.safetensors"


def save_univae(vae, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``vae`` (a :class:`~rosim.univae.model.UniVAE`) to ``directory``, atomically."""
    from safetensors.torch import save_file

    from rosim.checkpoints.io import atomic_directory, save_checkpoint

    latent = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items() if not k.startswith("backbone.")}
    with atomic_directory(directory) as tmp:
        save_checkpoint(tmp, vae.backbone, vae.tokenizer, metadata={"univae": True, **(metadata or {})})
        save_file(latent, str(tmp / UNIVAE_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / UNIVAE_CONFIG_NAME).write_text(
            json.dumps({"model_type": "univae", **vae.config.to_dict()}, indent=2, ensure_ascii=False),
            encoding="utf-8")
    return Path(directory)


def read_univae_config(directory: Path) -> UniVAEConfig:
    """The :class:`UniVAEConfig` in ``directory/univae.json``, or a :class:`CheckpointError` that says what is wrong."""
    path = directory / UNIVAE_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is a rosim checkpoint but not a UniVAE ({UNIVAE_CONFIG_NAME} not found); "
            f"train one with `rosim vae train --init {directory} ...`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("model_type") != "univae":
            raise CheckpointError(f"{path} does not describe a UniVAE (model_type must be 'univae')")
        return UniVAEConfig.from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except (InputError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {exc}") from None


def load_univae(cls, directory: str | os.PathLike):
    """A ``cls`` (:class:`~rosim.univae.model.UniVAE`) saved by :func:`save_univae`, in eval mode;
    every tensor must match (strict)."""
    from rosim.checkpoints.io import load_checkpoint, load_state_strict, read_safetensors

    directory = Path(directory)
    backbone, tokenizer, _ = load_checkpoint(directory)
    vae = cls(backbone, tokenizer, read_univae_config(directory))
    latent = read_safetensors(directory / UNIVAE_WEIGHTS_NAME)
    state = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}, **latent}
    load_state_strict(vae, state, source=str(directory / UNIVAE_WEIGHTS_NAME))
    return vae.eval()


def univae_on_backbone(cls, directory: str | os.PathLike, **config):
    """A new ``cls`` on the rosim checkpoint in ``directory`` (fresh latent projections)."""
    from rosim.checkpoints.io import load_checkpoint

    backbone, tokenizer, _ = load_checkpoint(directory)
    return cls(backbone, tokenizer, UniVAEConfig(**config))
