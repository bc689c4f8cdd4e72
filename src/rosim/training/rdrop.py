"""R-Drop: a consistency loss between two dropout passes of the same inputs (spec rdrop §A).

Run every input twice (dropout draws an independent mask per row, so duplicating rows inside one
batch is enough: :func:`duplicate_batch` / :func:`split_outputs`), then add to the task loss of
both passes a term that pulls the two predictive distributions together.

Normalisation (the one convention used by every function here)
----------------------------------------------------------------
With ``P1``, ``P2`` the two passes, ``KL(P‖Q) = Σ_c P_c (log P_c − log Q_c)`` summed over classes
and ``SKL = ½ [KL(P1‖P2) + KL(P2‖P1)]`` (the post's L_KL)::

    L = ½ (CE1 + CE2) + (α/2) · SKL

where CE_k and SKL are **means over samples** (over unmasked tokens for sequences). This is the
post's formula ``CE1 + CE2 + α·SKL`` divided by two, i.e. exactly Su's bert4keras code
(``mean(CE over the 2B rows) + α/4 · mean(kld(p1,p2) + kld(p2,p1))``): α means what it means in
the post and in Su's code (he uses α = 4; the paper 0.3 … 5), and with α = 0 the loss *is* the
ordinary cross-entropy, so learning rates carry over from training without R-Drop.
(dropreg/R-Drop's README sums the KL over the batch while averaging the CE: its α is ours divided
by ``2 × batch size``.)

The other forms keep the same shape:

* token level (seq2seq): logits ``(B, L, V)`` with a padding / target ``mask`` ``(B, L)``; means
  are over the unmasked tokens, KL summed over the vocabulary per token;
* regression (Su's general form with D = squared error): ``½ (D(y,f1) + D(y,f2)) + (α/2)·D(f1,f2)``,
  D the squared error summed over the output dimension (if any) and averaged over samples;
* unlabelled (semi-supervised): only the consistency term ``(α/2) · SKL`` (or ``(α/2)·D(f1,f2)``),
  so that labelled loss = CE part + unlabelled loss on the same outputs.

``reduction="sum"`` returns the same quantities summed instead of averaged over samples/tokens,
for callers that divide by a count taken over a larger (e.g. distributed) batch.

Masked classes (logits set to ``-inf`` or a huge negative number, identically in both passes)
contribute nothing to the KL; a class masked in one pass only gives an infinite KL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map_only

from rosim.errors import InputError

__all__ = [
    "RDropLoss", "RDropParts", "duplicate_batch", "rdrop_consistency_loss", "rdrop_loss", "rdrop_mse_loss",
    "split_outputs", "symmetric_kl",
]

Reduction = Literal["mean", "sum"]
DupMode = Literal["concat", "interleave"]


class RDropParts(NamedTuple):
    """The total loss and its two parts (``loss = task + consistency``)."""

    loss: Tensor
    task: Tensor  # ½ (CE1 + CE2) or ½ (D(y,f1) + D(y,f2))
    consistency: Tensor  # (α/2) · SKL or (α/2) · D(f1, f2)


# --------------------------------------------------------------------------------------------
# checks and reductions
# --------------------------------------------------------------------------------------------
def _check_pair(a: Tensor, b: Tensor, names=("logits1", "logits2"), min_dim: int = 1) -> None:
    for x, name in zip((a, b), names, strict=True):
        if not isinstance(x, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() < min_dim:
            raise InputError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    if a.shape != b.shape:
        raise InputError(f"the two passes must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise InputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
        raise InputError(f"alpha must be a number >= 0, got {alpha!r}")


def _sample_mask(shape: torch.Size, mask: Tensor | None, device) -> Tensor:
    """A bool mask over the sample dimensions ``shape`` (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise InputError(f"mask must have shape {tuple(shape)} (the logits without the class axis), got {tuple(mask.shape)}")
    return mask.to(device).bool()


def _reduce(values: Tensor, keep: Tensor, reduction: str) -> Tensor:
    """Sum or mean of ``values`` over the kept samples; the mean of nothing is an error."""
    total = values[keep].sum()
    if reduction == "sum":
        return total
    count = int(keep.sum())
    if count == 0:
        raise InputError("every sample is masked out: nothing to average")
    return total / count


def _upcast(x: Tensor) -> Tensor:
    """Losses are computed in float32 at least (half-precision outputs are upcast)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_probs(logits: Tensor) -> Tensor:
    """Log-softmax (float32 at least); -inf logits (masked classes) become the most negative finite float."""
    x = _upcast(logits)
    x = torch.nan_to_num(x, nan=float("nan"), neginf=torch.finfo(x.dtype).min, posinf=torch.finfo(x.dtype).max)
    return F.log_softmax(x, dim=-1)


# --------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------
def symmetric_kl(
    logits1: Tensor, logits2: Tensor, mask: Tensor | None = None, reduction: Reduction = "mean"
) -> Tensor:
    """``SKL = ½ [KL(P1‖P2) + KL(P2‖P1)]`` per sample (KL summed over the last axis), then reduced.

    ``logits`` are ``(..., C)``; ``mask`` is ``(...)`` (True = counted), e.g. ``(B, L)`` for tokens.
    """
    _check_pair(logits1, logits2)
    _check_reduction(reduction)
    keep = _sample_mask(logits1.shape[:-1], mask, logits1.device)
    lp1, lp2 = _log_probs(logits1), _log_probs(logits2)
    kl12 = (lp1.exp() * (lp1 - lp2)).sum(-1)
    kl21 = (lp2.exp() * (lp2 - lp1)).sum(-1)
    return _reduce(0.5 * (kl12 + kl21), keep, reduction)


def rdrop_consistency_loss(
    logits1: Tensor, logits2: Tensor, *, alpha: float = 1.0, mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """The unlabelled (KL-only, semi-supervised) form: ``(α/2) · SKL``."""
    _check_alpha(alpha)
    return 0.5 * alpha * symmetric_kl(logits1, logits2, mask, reduction)


def rdrop_loss(
    logits1: Tensor,
    logits2: Tensor,
    labels: Tensor,
    *,
    alpha: float = 4.0,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    return_parts: bool = False,
) -> Tensor | RDropParts:
    """Classification or token-level R-Drop: ``½ (CE1 + CE2) + (α/2) · SKL``.

    ``logits1``/``logits2`` are the two passes ``(..., C)``; ``labels`` is ``(...)`` class ids.
    Samples where ``labels == ignore_index`` or where ``mask`` is False (padding, source tokens of a
    seq2seq row) count in neither term. For sequences pass logits ``(B, L, V)``, labels ``(B, L)``
    and the target mask ``(B, L)``; means are over the counted tokens.
    """
    _check_pair(logits1, logits2)
    _check_alpha(alpha)
    _check_reduction(reduction)
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(logits1.shape[:-1]):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise InputError(f"labels must have shape {tuple(logits1.shape[:-1])} (the logits without the class axis), got {shape}")
    if labels.is_floating_point():
        raise InputError(f"labels must be integer class ids, got {labels.dtype}")
    keep = _sample_mask(logits1.shape[:-1], mask, logits1.device) & (labels != ignore_index)
    n_classes = logits1.shape[-1]
    bad = keep & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        raise InputError(f"labels must lie in [0, {n_classes}) (or be ignore_index={ignore_index}); got {int(labels[bad][0])}")
    safe = labels.masked_fill(~keep, 0)
    ce = [F.nll_loss(_log_probs(x).reshape(-1, n_classes), safe.reshape(-1), reduction="none").view(labels.shape)
          for x in (logits1, logits2)]
    task = 0.5 * (_reduce(ce[0], keep, reduction) + _reduce(ce[1], keep, reduction))
    consistency = 0.5 * alpha * symmetric_kl(logits1, logits2, keep, reduction)
    loss = task + consistency
    return RDropParts(loss, task, consistency) if return_parts else loss


def _squared_error(a: Tensor, b: Tensor, sample_dims: int) -> Tensor:
    d = (_upcast(a) - _upcast(b)) ** 2
    return d.flatten(sample_dims).sum(-1) if d.dim() > sample_dims else d


def rdrop_mse_loss(
    pred1: Tensor,
    pred2: Tensor,
    target: Tensor | None = None,
    *,
    alpha: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    return_parts: bool = False,
) -> Tensor | RDropParts:
    """Regression R-Drop with D = squared error: ``½ (D(y,f1) + D(y,f2)) + (α/2) · D(f1,f2)``.

    ``pred`` is ``(N,)`` (one score per sample) or ``(N, d)`` (D summed over ``d``); ``target`` has
    the same shape. Without ``target`` only the consistency term ``(α/2) · D(f1, f2)`` is returned
    (the unlabelled form). ``mask`` is ``(N,)``.
    """
    _check_pair(pred1, pred2, ("pred1", "pred2"))
    _check_alpha(alpha)
    _check_reduction(reduction)
    if pred1.dim() > 2:
        raise InputError(f"predictions must be (N,) or (N, d), got shape {tuple(pred1.shape)}")
    keep = _sample_mask(pred1.shape[:1], mask, pred1.device)
    consistency = 0.5 * alpha * _reduce(_squared_error(pred1, pred2, 1), keep, reduction)
    if target is None:
        return RDropParts(consistency, torch.zeros_like(consistency), consistency) if return_parts else consistency
    if not isinstance(target, Tensor) or target.shape != pred1.shape:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise InputError(f"target must have the predictions' shape {tuple(pred1.shape)}, got {shape}")
    target = target.to(pred1.device)
    task = 0.5 * (_reduce(_squared_error(target, pred1, 1), keep, reduction)
                  + _reduce(_squared_error(target, pred2, 1), keep, reduction))
    loss = task + consistency
    return RDropParts(loss, task, consistency) if return_parts else loss


class RDropLoss(nn.Module):
    """R-Drop as a module: ``RDropLoss(alpha)(out1, out2, labels=None, mask=None)``.

    ``distance="kl"``: ``out`` are logits; with ``labels`` the classification / token-level loss
    (:func:`rdrop_loss`), without them the unlabelled consistency term (:func:`rdrop_consistency_loss`).
    ``distance="mse"``: ``out`` are regression outputs (:func:`rdrop_mse_loss`).
    """

    def __init__(self, alpha: float = 4.0, *, distance: Literal["kl", "mse"] = "kl",
                 reduction: Reduction = "mean", ignore_index: int = -100):
        super().__init__()
        _check_alpha(alpha)
        _check_reduction(reduction)
        if distance not in ("kl", "mse"):
            raise InputError(f"distance must be 'kl' or 'mse', got {distance!r}")
        self.alpha, self.distance, self.reduction, self.ignore_index = float(alpha), distance, reduction, ignore_index

    def forward(self, out1: Tensor, out2: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if self.distance == "mse":
            return rdrop_mse_loss(out1, out2, labels, alpha=self.alpha, mask=mask, reduction=self.reduction)
        if labels is None:
            return rdrop_consistency_loss(out1, out2, alpha=self.alpha, mask=mask, reduction=self.reduction)
        return rdrop_loss(out1, out2, labels, alpha=self.alpha, mask=mask, ignore_index=self.ignore_index,
                          reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, distance={self.distance!r}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------------
# two passes in one batch
# --------------------------------------------------------------------------------------------
def _map_rows(fn: Callable[[Tensor], Tensor], tree: Any, what: str) -> Any:
    """``fn`` applied to every tensor with a row dimension in the pytree ``tree`` (other leaves kept)."""
    if not any(isinstance(leaf, Tensor) and leaf.dim() > 0 for leaf in tree_leaves(tree)):
        raise InputError(f"{what} holds no tensor with a row dimension (dict, list, tuple and namedtuple are walked; "
                         f"register other containers with torch.utils._pytree, e.g. register_dataclass)")
    return tree_map_only(Tensor, lambda x: fn(x) if x.dim() > 0 else x, tree)


def duplicate_batch(batch: Any, mode: DupMode = "concat") -> Any:
    """Every row twice, for two dropout passes in one forward.

    ``batch`` is a tensor (rows on dim 0) or a pytree of them: dict / list / tuple / namedtuple, or a
    container registered with :mod:`torch.utils._pytree` (other leaves and 0-dim tensors are kept). ``mode="concat"`` gives ``[x; x]`` (the paper); ``"interleave"`` puts the
    copies of row ``i`` at rows ``2i`` and ``2i+1`` (Su's data generator). Undo with :func:`split_outputs`.
    """
    if mode not in ("concat", "interleave"):
        raise InputError(f"mode must be 'concat' or 'interleave', got {mode!r}")

    def dup(x: Tensor) -> Tensor:
        return torch.cat([x, x]) if mode == "concat" else x.repeat_interleave(2, dim=0)

    return _map_rows(dup, batch, "batch")


def split_outputs(outputs: Any, mode: DupMode = "concat") -> tuple[Any, Any]:
    """The two passes ``(first, second)`` of outputs computed on :func:`duplicate_batch` rows."""
    if mode not in ("concat", "interleave"):
        raise InputError(f"mode must be 'concat' or 'interleave', got {mode!r}")

    def half(k: int) -> Callable[[Tensor], Tensor]:
        def rows_of_pass(x: Tensor) -> Tensor:
            if x.shape[0] % 2:
                raise InputError(f"outputs of a duplicated batch have an even number of rows, got {x.shape[0]}")
            n = x.shape[0] // 2
            return (x[:n] if k == 0 else x[n:]) if mode == "concat" else x[k::2]
        return rows_of_pass

    return _map_rows(half(0), outputs, "outputs"), _map_rows(half(1), outputs, "outputs")


# --------------------------------------------------------------------------------------------
# the UniLM generation loss of stage 1 / stage 2
# --------------------------------------------------------------------------------------------
def generation_rdrop_sum(
    model, hidden1: Tensor, hidden2: Tensor, input_ids: Tensor, token_type_ids: Tensor,
    attention_mask: Tensor | None, alpha: float,
) -> RDropParts:
    """Token-level R-Drop on the UniLM generation loss, **summed** over target tokens.

    ``hidden1``/``hidden2`` are the last hidden states of two dropout passes over the same rows;
    logits are computed only at the target positions (segment 1, padding excluded, as
    :func:`rosim.training.losses.generation_loss`). Divide by the (global) number of target tokens
    to get ``½ (CE1 + CE2) + (α/2) · SKL`` averaged per token.
    """
    from rosim.training.losses import generation_target_mask

    mask = generation_target_mask(token_type_ids, attention_mask)
    targets = input_ids[:, 1:][mask]
    logits1 = model.lm_logits(hidden1[:, :-1][mask])
    logits2 = model.lm_logits(hidden2[:, :-1][mask])
    return rdrop_loss(logits1, logits2, targets, alpha=alpha, reduction="sum", return_parts=True)
