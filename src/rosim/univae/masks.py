"""The two attention masks that make one Transformer an encoder and a decoder (with c = cumsum(segment ids)):

* **independent** (the layers before the latent ones): query i sees key j iff ``s_i == s_j and
  c_j <= c_i`` — the encoder copy (segment 0) is bidirectional, the decoder copy (segment 1)
  causal, and neither sees the other;
* **UniAE** (the latent layers): the same, plus every query sees position 0 (the encoder's [CLS],
  which holds the latent there).
"""

from __future__ import annotations

import torch


def make_uniae_mask(segment_ids: torch.Tensor, *, expose_cls: bool) -> torch.Tensor:
    """Visibility ``(B, 1, T, T)`` (True = may attend) for segment ids ``(B, T)``.

    ``expose_cls=False`` is the independent mask (M[i,j] = s_i == s_j and c_j <= c_i with
    c = cumsum(s)); ``expose_cls=True`` is the UniAE mask: the same with column 0 visible to all.
    """
    s = segment_ids
    c = torch.cumsum(s, dim=-1)
    allowed = (s[:, :, None] == s[:, None, :]) & (c[:, None, :] <= c[:, :, None])
    if expose_cls:
        allowed[:, :, 0] = True
    return allowed.unsqueeze(1)


def uniae_attention_bias(segment_ids: torch.Tensor, *, expose_cls: bool, dtype: torch.dtype) -> torch.Tensor:
    """:func:`make_uniae_mask` as an additive bias ``(B, 1, T, T)``: 0 where allowed, the lowest
    ``dtype`` number elsewhere (the backbone adds the padding mask)."""
    allowed = make_uniae_mask(segment_ids, expose_cls=expose_cls)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
