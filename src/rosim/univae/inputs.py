"""The UniVAE's input layout ``[x ; x]``: the encoder copy ``[CLS] x [SEP]`` in segment 0 and the
decoder copy ``[CLS] x [SEP]`` in segment 1, both padded to the same length L.

The decoder copy always starts at position ``maxlen`` (rotary positions), whatever the batch's padded
length, so the decoder cannot read the sentence length from its start position (the reference pads
both copies to ``maxlen`` for the same reason; padding to the batch's longest row gives identical
outputs and costs less).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rosim.errors import InputError
from rosim.tokenization.tokenizer import CharTokenizer


@dataclass
class UniVAEInputs:
    """``[x ; x]`` for a batch: ``(B, 2L)`` ids, segments and padding mask, ``(1, 2L)`` positions."""

    input_ids: torch.Tensor
    segment_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def length(self) -> int:
        """L, the padded length of each copy; the decoder copy is ``[:, L:]``."""
        return self.input_ids.shape[1] // 2

    def to(self, device) -> UniVAEInputs:
        return UniVAEInputs(*(t.to(device) for t in dataclasses.astuple(self)))

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def token_rows(tokenizer: CharTokenizer, texts: str | Sequence[str], maxlen: int) -> list[list[int]]:
    """``[CLS] x [SEP]`` ids of each text, truncated to ``maxlen`` tokens; empty texts are refused."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise InputError("no texts given")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InputError(f"text {i} is a {type(t).__name__}, expected str")
        if not t.strip():
            raise InputError(f"text {i} is empty or whitespace only")
    return [tokenizer.build_inputs(ids, None, maxlen)[0] for ids in tokenizer.encode_batch_ids(items)]


def build_univae_inputs(tokenizer: CharTokenizer, texts: str | Sequence[str], maxlen: int, *,
                        pad_to: int | None = None) -> UniVAEInputs:
    """``[CLS] x [SEP]`` twice, each copy padded to the batch's longest row (or ``pad_to``), the
    decoder copy at positions ``maxlen, maxlen + 1, ...``. Texts longer than ``maxlen - 2`` tokens
    are truncated."""
    rows = token_rows(tokenizer, texts, maxlen)
    longest = max(len(r) for r in rows)
    length = longest if pad_to is None else pad_to
    if length < longest or length > maxlen:
        raise InputError(f"pad_to must lie in [{longest}, {maxlen}], got {pad_to}")
    one = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        one[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    segments = torch.cat([torch.zeros_like(one), torch.ones_like(one)], dim=1)
    positions = torch.cat([torch.arange(length), maxlen + torch.arange(length)])[None]
    return UniVAEInputs(torch.cat([one, one], 1), segments, torch.cat([mask, mask], 1), positions)
