"""Next-token sampling: temperature, top-k and nucleus (top-p), reproducible with a generator."""

from __future__ import annotations

import torch

from rosim.errors import InputError


def check_sampling_args(top_p: float | None, top_k: int | None, temperature: float) -> None:
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise InputError(f"top_k must be a positive integer, got {top_k!r}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")


def filter_logits(logits: torch.Tensor, *, top_p: float | None = None, top_k: int | None = None,
                  temperature: float = 1.0) -> torch.Tensor:
    """Return log-probabilities ``(N, V)`` after temperature, top-k and top-p; removed tokens are -inf.

    The nucleus keeps the most probable tokens up to **and including** the one whose cumulative
    probability first reaches ``top_p`` (bert4keras ``random_sample``), so at least one token stays.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_k is not None and top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
        logp = torch.log_softmax(logp, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)  # ties: lower id first
        # drop a token when the mass *before* it already reaches p. That mass is an exclusive
        # cumulative sum in float64 of the float32 probabilities (exact for them in practice), never
        # "cumsum - p", whose rounding can put a mass of exactly p just below p and keep a token more.
        mass = sorted_logp.exp().double().cumsum(dim=-1)
        before = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], dim=-1)
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def sample(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from log-probabilities, by inverse-CDF on uniform draws (order-stable)."""
    probs = logp.exp()
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)
