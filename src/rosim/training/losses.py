"""Training losses, as plain functions of tensors.

Every loss returns a 0-dim tensor (the mean over rows) so that it plugs directly into
:mod:`rosim.training.gradcache`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rosim.errors import InputError

__all__ = [
    "pair_targets",
    "roformer_sim_contrastive_loss",
    "query_document_contrastive_loss",
    "contrastive_embedding_grad",
]

# =====================================================================================================
# In-batch contrastive losses (RoFormer-Sim / SimBERT, query-document) and the closed-form gradient
# spec: ../shared/spec/roformer-sim.md §B (L_sim), ../shared/spec/rdrop-univae-gradcache.md §C
# =====================================================================================================


def _check_matrix(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise InputError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _upcast(x: Tensor) -> Tensor:
    """Compute losses in float32 when the embeddings are half precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pair_targets(n: int, device: torch.device | str | None = None) -> Tensor:
    """Positive index of each row when rows (2k, 2k+1) are pairs: ``i + 1 - 2 (i mod 2)``."""
    i = torch.arange(n, device=device)
    return i + 1 - 2 * (i % 2)


def _check_pairs(emb: Tensor, name: str = "emb") -> None:
    _check_matrix(emb, name)
    n = emb.shape[0]
    if n < 2 or n % 2:
        raise InputError(
            f"{name} must hold an even number (>= 2) of rows, rows 2k and 2k+1 being a positive pair; "
            f"got {n} rows"
        )


def roformer_sim_contrastive_loss(emb: Tensor, scale: float = 20.0) -> Tensor:
    """RoFormer-Sim's in-batch contrastive loss (SimBERT used ``scale=30``).

    ``Z = l2_normalize(emb)``; ``S = scale * Z Zᵀ`` with the diagonal excluded; row ``i``'s positive is
    its partner ``i + 1 - 2 (i mod 2)`` and every other row is a negative. Returns the mean
    cross-entropy over rows.
    """
    _check_pairs(emb)
    z = F.normalize(_upcast(emb), dim=-1, eps=1e-12)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    # scale first, then mask: a learnable (tensor) scale must not meet -inf in the backward
    logits = (scale * (z @ z.T)).masked_fill(eye, float("-inf"))
    return F.cross_entropy(logits, pair_targets(n, z.device))


def query_document_contrastive_loss(
    q: Tensor,
    d: Tensor,
    scale: float = 20.0,
    hard_negatives: Tensor | None = None,
    normalize: bool = True,
) -> Tensor:
    """In-batch query-document contrastive loss (DPR style), with optional hard negatives.

    ``q[i]``'s positive is ``d[i]``; every other ``d[j]`` and every hard negative (of any query) is a
    negative. ``hard_negatives`` is ``(M, dim)`` or ``(N, k, dim)`` (flattened to ``(N*k, dim)``).
    With ``normalize`` the scores are cosines; they are multiplied by ``scale``. Mean CE over queries.
    """
    _check_matrix(q, "q")
    _check_matrix(d, "d")
    if q.shape != d.shape:
        raise InputError(f"q and d must have the same shape (N, dim), got {tuple(q.shape)} and {tuple(d.shape)}")
    docs = d
    if hard_negatives is not None:
        if not isinstance(hard_negatives, Tensor) or hard_negatives.dim() not in (2, 3):
            shape = tuple(hard_negatives.shape) if isinstance(hard_negatives, Tensor) else type(hard_negatives)
            raise InputError(f"hard_negatives must be a tensor of shape (M, dim) or (N, k, dim), got {shape}")
        if hard_negatives.shape[-1] != d.shape[-1]:
            raise InputError(
                f"hard_negatives have dimension {hard_negatives.shape[-1]}, the documents {d.shape[-1]}"
            )
        docs = torch.cat([d, hard_negatives.reshape(-1, d.shape[-1]).to(d.dtype)])
    q, docs = _upcast(q), _upcast(docs)
    if normalize:
        q, docs = F.normalize(q, dim=-1, eps=1e-12), F.normalize(docs, dim=-1, eps=1e-12)
    logits = (q @ docs.T) * scale
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def contrastive_embedding_grad(
    emb: Tensor,
    scale: float = 20.0,
    targets: Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Closed-form gradient of the in-batch contrastive loss with respect to ``emb`` (Su, post 8471).

    With ``h = sqrt(scale) * z`` (``z = emb / |emb|`` if ``normalize`` else ``emb``), scores
    ``s_ij = <h_i, h_j>`` (diagonal excluded), ``P = softmax_rows(S)`` and one-hot targets ``T``, the
    gradient of the *summed* row losses with respect to ``h`` is

        h~ = 2 (P_bar - T_bar) H,   P_bar = (P + Pᵀ)/2,  T_bar = (T + Tᵀ)/2

    (``T_bar = T`` for the symmetric pair targets). It is then divided by N for ``reduction="mean"``
    and chained through ``h = sqrt(scale) * normalize(emb)``. With the defaults this equals
    ``d roformer_sim_contrastive_loss(emb, scale) / d emb``. ``targets`` defaults to the pairs
    ``(2k, 2k+1)``. Independent of autograd: used to check it.
    """
    _check_matrix(emb, "emb")
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n = emb.shape[0]
    if targets is None:
        _check_pairs(emb)
        targets = pair_targets(n, emb.device)
    if targets.shape != (n,) or bool(((targets < 0) | (targets >= n)).any()) or bool((targets == torch.arange(n, device=targets.device)).any()):
        raise InputError(f"targets must hold, for each of the {n} rows, the index of another row")
    with torch.no_grad():
        x = _upcast(emb)
        norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        z = x / norm if normalize else x
        h = math.sqrt(scale) * z
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        p = torch.softmax((h @ h.T).masked_fill(eye, float("-inf")), dim=-1)
        t = F.one_hot(targets, n).to(h.dtype)
        h_tilde = 2 * ((p + p.T) / 2 - (t + t.T) / 2) @ h
        if reduction == "mean":
            h_tilde = h_tilde / n
        g_z = math.sqrt(scale) * h_tilde
        if normalize:
            g_z = (g_z - z * (z * g_z).sum(-1, keepdim=True)) / norm
    return g_z.to(emb.dtype)


# =====================================================================================================
# Generation (UniLM seq2seq) and similarity-distillation losses — stage 1 / stage 2 of the recipe
# spec: ../shared/spec/roformer-sim.md §B (L_gen, stage-2 L_sim)
# =====================================================================================================


def generation_target_mask(token_type_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Which next-token predictions count: ``(B, L-1)`` bool, True where position ``t+1`` is a target.

    Targets are the segment-1 tokens (``target [SEP]``, the final [SEP] included), padding excluded.
    """
    mask = token_type_ids[:, 1:].bool()
    if attention_mask is not None:
        mask = mask & attention_mask[:, 1:].bool()
    return mask


def generation_loss(
    logits: Tensor,
    input_ids: Tensor,
    token_type_ids: Tensor,
    attention_mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Token cross-entropy of ``input_ids[:, 1:]`` against ``logits[:, :-1]`` on target tokens.

    ``logits`` is ``(B, L, V)``; targets are segment-1 tokens that are not padding (the final [SEP]
    included). ``reduction="mean"`` averages over those tokens (the recipe's L_gen); ``"sum"`` returns
    the sum, for callers that divide by a token count taken over a larger (distributed) batch.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise InputError(
            f"logits must be (batch, length, vocab) matching input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mask = generation_target_mask(token_type_ids, attention_mask)
    if not bool(mask.any()):
        raise InputError("no target tokens: every row needs segment-1 tokens (token_type_ids == 1)")
    picked = _upcast(logits[:, :-1][mask])
    return F.cross_entropy(picked, input_ids[:, 1:][mask], reduction=reduction)


def cosine_matrix(x: Tensor) -> Tensor:
    """Cosine similarities ``(n, n)`` between the rows of ``x``."""
    z = F.normalize(_upcast(x), dim=-1, eps=1e-12)
    return z @ z.T


def distillation_loss(student_vecs: Tensor, teacher_vecs: Tensor, weight: float = 100.0) -> Tensor:
    """Stage-2 similarity distillation: ``weight * mean_ij (cos_S[i,j] - cos_T[i,j])^2`` (λ = 100).

    The vector sizes of student and teacher may differ; only their cosine matrices are compared.
    The teacher side carries no gradient.
    """
    _check_matrix(student_vecs, "student_vecs")
    _check_matrix(teacher_vecs, "teacher_vecs")
    if student_vecs.shape[0] != teacher_vecs.shape[0]:
        raise InputError(
            f"student has {student_vecs.shape[0]} rows but teacher has {teacher_vecs.shape[0]}: one vector per row each"
        )
    s_student = cosine_matrix(student_vecs)
    s_teacher = cosine_matrix(teacher_vecs.detach().to(s_student.device))
    return weight * ((s_student - s_teacher) ** 2).mean()
