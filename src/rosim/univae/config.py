"""The UniVAE's own settings (the latent path), and which backbones can carry them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rosim.errors import InputError
from rosim.modeling.model import RoFormerSim
from rosim.univae.vmf import check_kappa


@dataclass
class UniVAEConfig:
    """The latent path. Defaults are the reference's: 4 latent layers × 16 dimensions, κ = 32, maxlen 32."""

    num_latent_layers: int = 4
    z_dim: int = 16
    kappa: float = 32.0
    maxlen: int = 32  # tokens per copy, [CLS] and [SEP] included; the decoder copy starts at this position
    extra: dict[str, Any] = field(default_factory=dict)  # provenance, never read by the model

    def __post_init__(self) -> None:
        for name, low in (("num_latent_layers", 1), ("z_dim", 2), ("maxlen", 3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"univae {name} must be an integer >= {low}, got {value!r}")
        self.kappa = check_kappa(self.kappa)

    def check_backbone(self, backbone: RoFormerSim) -> None:
        c = backbone.config
        if self.num_latent_layers > c.num_layers:
            raise InputError(
                f"num_latent_layers={self.num_latent_layers} exceeds the backbone's {c.num_layers} layers"
            )
        if c.type_vocab_size < 2:
            raise InputError("UniVAE needs two segment ids (type_vocab_size >= 2) for the encoder and decoder copies")
        if c.position == "absolute" and 2 * self.maxlen > c.max_position:
            raise InputError(f"2 * maxlen = {2 * self.maxlen} exceeds the backbone's max_position {c.max_position}")
        if backbone.lm_head is None:
            raise InputError("UniVAE needs a backbone with an LM head (with_lm_head=True) to decode")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniVAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise InputError(f"univae config has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})
