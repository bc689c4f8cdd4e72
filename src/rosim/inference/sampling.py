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


def sample(logp: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from log-probabilities, by inverse-CDF on uniform draws (order-stable):
    the first token, in id order, whose cumulative probability reaches ``u`` times the total."""
    probs = logp.exp()
    if u is None:
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def sample_top_p(logits: torch.Tensor, top_p: float, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None, candidates: int = 64) -> torch.Tensor:
    """``sample(filter_logits(logits, top_p=top_p, temperature=temperature), generator)`` without
    sorting the vocabulary when the nucleus lies within the ``candidates`` most probable tokens.

    ``topk`` finds the candidates; ordered by (probability desc, id asc) their exclusive float64
    cumulative mass gives the same kept prefix as the full stable sort, provided the token that
    crosses ``p`` is strictly more probable than the last candidate (so no token outside the
    candidates can tie with or precede it). Rows where that fails take the full sort. The token is
    drawn with the same uniform ``u`` per row and the same inverse CDF in id order over the kept
    tokens; only the summation order of the renormalising constant differs (last-bit effects).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    n, vocab = logp.shape
    u = torch.rand(n, 1, generator=generator, device=logp.device, dtype=logp.dtype)
    if top_p >= 1.0 or candidates >= vocab:
        return sample(filter_logits(logits, top_p=top_p, temperature=temperature), u=u)
    vals, idx = torch.topk(logp, candidates, dim=-1)
    by_id = torch.argsort(idx, dim=-1)
    vals, idx = vals.gather(-1, by_id), idx.gather(-1, by_id)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    mass = vals.exp().double().cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
    keep = before < top_p
    n_keep = keep.sum(-1)
    last_kept = vals.gather(-1, (n_keep - 1).clamp(min=0)[:, None]).squeeze(-1)
    fast = ~keep[:, -1] & (last_kept > vals[:, -1])
    out = torch.empty(n, dtype=torch.long, device=logp.device)
    if bool(fast.all()):
        rows = slice(None)
    else:
        slow = (~fast).nonzero().squeeze(-1)
        out[slow] = sample(filter_logits(logits[slow], top_p=top_p, temperature=temperature), u=u[slow])
        rows = fast.nonzero().squeeze(-1)
    v, i, k = vals[rows], idx[rows], keep[rows]
    kept_logp = v.masked_fill(~k, float("-inf"))
    probs = torch.log_softmax(kept_logp, dim=-1).exp()
    ids = i.masked_fill(~k, vocab)  # dropped candidates sort after every kept id
    id_order = torch.argsort(ids, dim=-1)
    probs, ids = probs.gather(-1, id_order), ids.gather(-1, id_order)
    cdf = probs.cumsum(dim=-1)
    pos = torch.searchsorted(cdf, u[rows] * cdf[:, -1:]).squeeze(-1).clamp(max=candidates - 1)
    out[rows] = ids.gather(-1, pos[:, None]).squeeze(-1).clamp(max=vocab - 1)
    return out
