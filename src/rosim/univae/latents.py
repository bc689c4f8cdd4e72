"""Checking what callers pass as latents: ``z`` arrays and latent-layer indices."""

from __future__ import annotations

import numpy as np
import torch

from rosim.errors import InputError


def check_latents(z, num_latent_layers: int, z_dim: int, *, device: torch.device, dtype: torch.dtype,
                  what: str = "z") -> torch.Tensor:
    """``z`` as a ``(n, num_latent_layers, z_dim)`` tensor on ``device``, each part unit-normalised.

    Accepts ``(n, layers, dim)``, the flat ``(n, layers * dim)`` of the reference, or one latent
    without the batch dimension.
    """
    n_lat, d = num_latent_layers, z_dim
    if isinstance(z, np.ndarray):
        z = torch.from_numpy(np.ascontiguousarray(z))
    if not isinstance(z, torch.Tensor):
        raise InputError(f"{what} must be a torch tensor or NumPy array, got {type(z).__name__}")
    if not (z.is_floating_point()):
        raise InputError(f"{what} must hold floating-point numbers, got dtype {z.dtype}")
    shape = tuple(z.shape)
    if shape in ((n_lat, d), (n_lat * d,)):
        z = z.unsqueeze(0)
    if z.dim() == 2 and z.shape[1] == n_lat * d:
        z = z.reshape(-1, n_lat, d)
    if z.dim() != 3 or tuple(z.shape[1:]) != (n_lat, d) or z.shape[0] == 0:
        raise InputError(
            f"{what} must have shape (n, {n_lat}, {d}) or (n, {n_lat * d}) for this model "
            f"({n_lat} latent layers x {d} dimensions), got {shape}"
        )
    if not bool(torch.isfinite(z).all()):
        raise InputError(f"{what} contains NaN or infinite values")
    z = z.to(device=device, dtype=dtype)
    norms = z.norm(dim=-1)
    if bool((norms < 1e-12).any()):
        row, part = (norms < 1e-12).nonzero()[0].tolist()
        raise InputError(f"{what}[{row}, {part}] is the zero vector: every latent part must have a direction")
    return z / norms.unsqueeze(-1)


def check_latent_layers(layers, num_latent_layers: int, *, first_layer: int, num_layers: int) -> list[int]:
    """Latent-layer indices (0 = first latent layer, negatives from the end) as sorted distinct
    indices in ``0..num_latent_layers - 1``; ``first_layer`` and ``num_layers`` place them among the
    backbone's transformer layers in the error message."""
    n = num_latent_layers
    if isinstance(layers, int):
        layers = [layers]
    try:
        items = list(layers)
    except TypeError:
        raise InputError(f"layers must be a list of latent-layer indices, got {layers!r}") from None
    if not items:
        raise InputError("layers is empty: name at least one latent layer to redraw")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise InputError(f"layers must hold integers, got {item!r}")
        if not -n <= item < n:
            raise InputError(
                f"latent layer {item} is out of range: this model has {n} latent layer(s), use 0..{n - 1} "
                f"(or -{n}..-1); 0 is the first latent layer (transformer layer {first_layer} "
                f"of 0..{num_layers - 1})"
            )
        out.append(int(item) % n)
    return sorted(set(out))
