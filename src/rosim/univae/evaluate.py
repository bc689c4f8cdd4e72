"""Reconstruction metrics: character accuracy (1 - character error rate) and exact match against
the normalised text (what a perfect reconstruction gives), and how much the decoder reads the latents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rosim.errors import InputError

if TYPE_CHECKING:
    from rosim.tokenization.tokenizer import CharTokenizer


def normalized_text(tokenizer: CharTokenizer, text: str, maxlen: int | None = None) -> str:
    """What a perfect reconstruction of ``text`` looks like: tokenised (and truncated), then decoded."""
    ids = tokenizer.encode_ids(text)
    if maxlen is not None:
        ids = ids[: maxlen - 2]
    return tokenizer.decode(ids)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def reconstruction_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``char_accuracy`` = 1 - (total edit distance / total reference characters), floored at 0;
    ``exact_match`` = share of predictions equal to their reference; also the positional accuracy
    (same character at the same index) for comparison."""
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise InputError("no references to score")
    edits = sum(edit_distance(p, r) for p, r in zip(predictions, references, strict=True))
    chars = sum(len(r) for r in references)
    same_pos = sum(sum(a == b for a, b in zip(p, r, strict=False)) for p, r in zip(predictions, references, strict=True))
    return {
        "n": len(references),
        "char_accuracy": max(0.0, 1.0 - edits / max(chars, 1)),
        "positional_char_accuracy": same_pos / max(chars, 1),
        "exact_match": sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references),
    }


def evaluate_reconstruction(vae, texts: Sequence[str], **decode_kwargs) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Reconstruct ``texts`` with ``vae`` and score against their normalised form (tokenised, truncated
    to ``maxlen - 2`` tokens, decoded). Returns the scores and the (reference, reconstruction) pairs."""
    refs = [normalized_text(vae.tokenizer, t, vae.config.maxlen) for t in texts]
    preds = vae.reconstruct(list(texts), **decode_kwargs)
    return reconstruction_scores(preds, refs), list(zip(refs, preds, strict=True))


def latent_usage(vae, texts: Sequence[str], *, batch_size: int = 64) -> dict[str, float]:
    """How much the decoder reads the latents: teacher-forced cross-entropy (nats per token) of each
    sentence given its own latent means vs given the means of another sentence of the set (rolled by
    one). A decoder that ignores ``z`` (posterior collapse) scores the same on both."""
    import torch

    items = list(texts)
    if len(items) < 2:
        raise InputError("latent_usage needs at least two sentences")
    z = vae.encode(items, batch_size=batch_size, convert_to="torch").to(vae.device)
    other = torch.roll(z, 1, dims=0)
    totals = {"own": 0.0, "other": 0.0}
    tokens = 0
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(items), batch_size):
                inputs = vae.build_inputs(items[s:s + batch_size]).to(vae.device)
                for key, latents in (("own", z), ("other", other)):
                    loss, n, _ = vae.loss(inputs, z=latents[s:s + batch_size])
                    totals[key] += float(loss) * n
                tokens += n
    finally:
        vae.train(was_training)
    own, shuffled = totals["own"] / tokens, totals["other"] / tokens
    return {"ce_own_latents": own, "ce_other_latents": shuffled, "latent_gain_nats": shuffled - own}
