"""From next-token logits to sequences, shared by :class:`~rosim.inference.sim_model.SimModel` and
:class:`~rosim.univae.UniVAE`.

* :func:`banned_token_ids` — the special tokens a generator never emits;
* :func:`seeded_generator` — the random stream of one generation call;
* :class:`TokenSampler` — one token per row: banned tokens, temperature, top-k, nucleus;
* :func:`tokens_until_end` — end-of-sequence bookkeeping: each row's tokens before its end token;
* :func:`sample_sequences` and :func:`beam_search` — decoding loops over a model's step function
  ``step(tokens, t, cache) -> (logits, cache)`` that feeds ``tokens`` ``(N,)`` as the ``t``-th new
  position and returns the next-token logits ``(N, vocab)``.

The per-row draws themselves (nucleus filter, inverse-CDF sampling) are :mod:`rosim.inference.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rosim.inference.sampling import filter_logits, sample, sample_top_p
from rosim.modeling.model import KVCache

Step = Callable[[torch.Tensor, int, object], tuple[torch.Tensor, object]]


def banned_token_ids(tokenizer, device: torch.device | str | None = None) -> torch.Tensor:
    """[PAD], [CLS], [MASK] and [UNK]: never generated."""
    return torch.tensor([tokenizer.pad_id, tokenizer.cls_id, tokenizer.mask_id, tokenizer.unk_id], device=device)


def seeded_generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, or for None with a seed drawn from torch's
    global random state (so ``torch.manual_seed`` makes unseeded calls reproducible too)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return generator


class TokenSampler:
    """Draws one token per row from next-token logits: banned tokens removed, then temperature,
    top-k and nucleus (top-p), with ``generator``.

    With top-p alone it uses :func:`~rosim.inference.sampling.sample_top_p`, which does not sort
    the vocabulary; ``partial_sort=False`` always takes the sort-based reference
    (:func:`~rosim.inference.sampling.filter_logits` then :func:`~rosim.inference.sampling.sample`),
    whose draws can differ from the partial sort's at last-bit ties of the cumulative mass.
    """

    def __init__(self, *, top_p: float | None, top_k: int | None, temperature: float,
                 generator: torch.Generator, banned: torch.Tensor, partial_sort: bool = True):
        self.top_p, self.top_k, self.temperature = top_p, top_k, temperature
        self.generator, self.banned, self.partial_sort = generator, banned, partial_sort

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids ``(N,)`` for logits ``(N, vocab)``. Float32 logits have their banned entries set
        to -inf in place (other dtypes are converted first)."""
        logits = logits.float()
        logits[:, self.banned] = float("-inf")
        if self.partial_sort and self.top_p is not None and self.top_k is None:
            return sample_top_p(logits, self.top_p, temperature=self.temperature, generator=self.generator)
        logp = filter_logits(logits, top_p=self.top_p, top_k=self.top_k, temperature=self.temperature)
        return sample(logp, self.generator)


def tokens_until_end(rows: torch.Tensor | Sequence[Sequence[int]], end_id: int) -> tuple[list[list[int]], list[bool]]:
    """Each row's tokens before its first ``end_id``, and whether it has one. A negative id marks a
    step the row never reached (it was cut before ending) and stops the row there too."""
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist()
    out, ended = [], []
    for row in rows:
        kept: list[int] = []
        stop = None
        for token in row:
            if token == end_id or token < 0:
                stop = token
                break
            kept.append(token)
        out.append(kept)
        ended.append(stop == end_id)
    return out, ended


def select_rows(cache, rows: torch.Tensor):
    """The cache with only ``rows`` (in that order): a :class:`KVCache` in place, or new per-layer
    ``(k, v)`` pairs (None stays None)."""
    if isinstance(cache, KVCache):
        cache.select(rows)
        return cache
    return [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in cache]


@torch.no_grad()
def sample_sequences(step: Step, cache, *, rows: int, max_new: int, sampler: TokenSampler, start_id: int,
                     end_id: int, pad_id: int, device: torch.device) -> list[list[int]]:
    """Sample up to ``max_new`` tokens per row, then the end token: step 0 feeds ``start_id``.

    Every row stays in the batch to the end (an ended row is fed ``pad_id``), so each step draws one
    uniform number per row of the batch: the random stream does not depend on when rows end.
    Returns each row's tokens without the end token.
    """
    tokens = torch.full((rows,), start_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    drawn = torch.full((rows, max_new + 1), -1, dtype=torch.long, device=device)
    for t in range(max_new + 1):  # max_new tokens, then the end token
        logits, cache = step(tokens, t, cache)
        tokens = sampler(logits) if t < max_new else torch.full_like(tokens, end_id)
        tokens = tokens.masked_fill(finished, pad_id)
        drawn[:, t] = tokens
        finished |= tokens == end_id
        if bool(finished.all()):
            break
    return tokens_until_end(drawn, end_id)[0]


@torch.no_grad()
def beam_search(step: Step, cache, *, rows: int, beam_size: int, max_new: int, start_id: int, end_id: int,
                pad_id: int, banned: torch.Tensor) -> list[list[int]]:
    """The best sequence per row by summed log-probability, at most ``max_new`` tokens then the
    end token; ``beam_size=1`` is greedy decoding.

    ``cache`` holds ``rows * beam_size`` rows, the beams of a row adjacent. A row stops when its
    best beam has ended (exact: live scores only decrease); an ended beam keeps its score (it is
    extended by ``pad_id`` at no cost). ``banned`` tokens are never chosen.
    Returns each row's best tokens without the end token.
    """
    k, device = beam_size, banned.device
    scores = torch.zeros(rows, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    tokens = torch.full((rows * k,), start_id, dtype=torch.long, device=device)
    seqs = torch.empty(rows * k, 0, dtype=torch.long, device=device)
    finished = torch.zeros(rows * k, dtype=torch.bool, device=device)
    for t in range(max_new + 1):  # max_new tokens, then the end token
        logits, cache = step(tokens, t, cache)
        logp = torch.log_softmax(logits, dim=-1)
        logp[:, banned] = float("-inf")
        if t == max_new:  # out of room: only the end token may follow
            keep = logp[:, end_id].clone()
            logp.fill_(float("-inf"))
            logp[:, end_id] = keep
        logp[finished] = float("-inf")
        logp[finished, pad_id] = 0.0
        vocab = logp.shape[-1]
        scores, idx = (scores.reshape(-1, 1) + logp).reshape(rows, k * vocab).topk(k, dim=-1)
        beams = (torch.arange(rows, device=device)[:, None] * k + idx // vocab).reshape(-1)
        tokens = (idx % vocab).reshape(-1)
        seqs = torch.cat([seqs[beams], tokens[:, None]], dim=1)
        finished = finished[beams] | (tokens == end_id)
        cache = select_rows(cache, beams)
        if bool(finished.reshape(rows, k)[:, 0].all()):
            break
    return tokens_until_end(seqs.reshape(rows, k, -1)[:, 0], end_id)[0]
