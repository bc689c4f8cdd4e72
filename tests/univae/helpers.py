"""A tiny UniVAE for tests: 3 layers, the last 2 with latents of 4 dimensions."""

from __future__ import annotations

from rosim.univae import UniVAE, UniVAEConfig
from tests.helpers import SENTENCES, tiny_model


def tiny_vae(seed: int = 0, *, num_layers: int = 3, num_latent_layers: int = 2, z_dim: int = 4, kappa: float = 8.0,
             maxlen: int = 16, **model_kw) -> UniVAE:
    model, tok = tiny_model(seed=seed, num_layers=num_layers, **model_kw)
    return UniVAE(model, tok, UniVAEConfig(num_latent_layers=num_latent_layers, z_dim=z_dim, kappa=kappa,
                                           maxlen=maxlen)).eval()


__all__ = ["SENTENCES", "tiny_vae"]
