"""The pair head of supervised training and its objective (spec roformer-sim §D).

Each pair ``(a, b)`` is encoded sentence by sentence (``[CLS] s [SEP]``, bidirectional attention,
the linear pooler), ``u`` and ``v`` are merged into ``[u, v, |u − v|]`` and one shared
``Dense(3H → 5, no bias)`` head scores five classes (0/1 binary, 2 contradiction, 3 entailment,
4 neutral). The cross-entropy is *task-masked*: a binary pair's logits 2–4 and an NLI pair's
logits 0–1 are set to −1e12 before the softmax, so each pair is a 2-way or a 3-way problem on one
head. With ``rdrop_alpha > 0`` every pair is run twice (two dropout masks) and the loss is
:func:`rosim.training.rdrop.rdrop_loss` (``½ (CE1 + CE2) + (α/2) · SKL``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rosim.errors import InputError
from rosim.modeling.model import RoFormerSim
from rosim.tokenization.tokenizer import CharTokenizer, Encoding
from rosim.training.rdrop import duplicate_batch, rdrop_loss, split_outputs
from rosim.training.stages import Objective, StepContext

NUM_CLASSES = 5
CLASS_NAMES = ("binary:0", "binary:1", "contradiction", "entailment", "neutral")
MASK_VALUE = -1e12  # bert4keras' K.infinity(): a finite "minus infinity" keeps every loss finite
HEAD_FILE = "pair_head.safetensors"


def task_class_mask(tasks: torch.Tensor) -> torch.Tensor:
    """``(N, 5)`` bool: True for the classes each pair's task may take (task 0 binary, 1 NLI)."""
    classes = torch.arange(NUM_CLASSES, device=tasks.device)
    nli = tasks.to(torch.bool)[:, None]
    return torch.where(nli, classes >= 2, classes < 2)


def mask_task_logits(logits: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """float32 logits with the other task's classes set to −1e12 (``special_crossentropy``)."""
    return logits.float().masked_fill(~task_class_mask(tasks), MASK_VALUE)


class PairHead(nn.Module):
    """``Dense(3H → 5, no bias)`` over ``[u, v, |u − v|]`` (InferSent / Sentence-BERT)."""

    def __init__(self, hidden_size: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.hidden_size, self.num_classes = hidden_size, num_classes
        self.dense = nn.Linear(3 * hidden_size, num_classes, bias=False)
        nn.init.xavier_uniform_(self.dense.weight)  # Keras' glorot_uniform

    @staticmethod
    def features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([u, v, (u - v).abs()], dim=-1)

    def forward(self, u: torch.Tensor, v: torch.Tensor, tasks: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(N, 5)``; with ``tasks`` the other task's classes are masked (float32)."""
        logits = self.dense(self.features(u, v))
        return logits if tasks is None else mask_task_logits(logits, tasks)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        save_file({"dense.weight": self.dense.weight.detach().cpu().contiguous()}, str(path),
                  metadata={"hidden_size": str(self.hidden_size), "classes": json.dumps(CLASS_NAMES)})

    @classmethod
    def load(cls, path: str | os.PathLike, hidden_size: int) -> PairHead:
        from rosim.checkpoints.io import read_safetensors
        from rosim.errors import CheckpointError

        state = read_safetensors(path)
        weight = state.get("dense.weight")
        if weight is None or tuple(weight.shape) != (NUM_CLASSES, 3 * hidden_size):
            shape = None if weight is None else tuple(weight.shape)
            raise CheckpointError(f"{path}: expected dense.weight of shape {(NUM_CLASSES, 3 * hidden_size)}, got {shape}")
        head = cls(hidden_size)
        head.dense.weight.data.copy_(weight)
        return head


def pair_classification_loss(
    logits1: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor,
    logits2: torch.Tensor | None = None, rdrop_alpha: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Task-masked cross-entropy (mean over pairs); with a second pass, R-Drop on the masked logits.

    Returns ``{"loss", "ce", "kl"}`` (``kl`` is the consistency term ``(α/2)·SKL``, 0 with one pass).
    """
    l1 = mask_task_logits(logits1, tasks)
    if logits2 is None:
        ce = F.cross_entropy(l1, labels)
        return {"loss": ce, "ce": ce, "kl": torch.zeros((), device=ce.device)}
    parts = rdrop_loss(l1, mask_task_logits(logits2, tasks), labels, alpha=rdrop_alpha, return_parts=True)
    return {"loss": parts.loss, "ce": parts.task, "kl": parts.consistency}


@dataclass
class PairBatch:
    """``encoding`` holds rows ``a0, b0, a1, b1, …`` (``[CLS] s [SEP]``); one label and task per pair."""

    encoding: Encoding
    labels: torch.Tensor  # (N,) class ids
    tasks: torch.Tensor  # (N,) 0 binary, 1 NLI

    @property
    def num_tokens(self) -> int:
        return int(self.encoding.attention_mask.sum())


def encode_pairs_batch(tokenizer: CharTokenizer, pairs: Sequence[tuple[str, str, int, int]], maxlen: int) -> PairBatch:
    """``(text_a, text_b, class, task)`` tuples → a :class:`PairBatch` (each sentence cut to ``maxlen`` tokens)."""
    texts = [t for a, b, _, _ in pairs for t in (a, b)]
    ids = tokenizer.encode_batch_ids(texts)
    enc = tokenizer.pad([tokenizer.build_inputs(i, None, maxlen) for i in ids])
    labels = torch.tensor([c for _, _, c, _ in pairs], dtype=torch.long)
    tasks = torch.tensor([k for _, _, _, k in pairs], dtype=torch.long)
    return PairBatch(enc, labels, tasks)


class SupervisedObjective(Objective):
    """Task-masked CE of the SBERT head over pooler vectors; optional R-Drop (two passes in one batch)."""

    name = "supervised"

    def __init__(self, head: PairHead, rdrop_alpha: float = 0.0):
        if not rdrop_alpha >= 0:
            raise InputError(f"rdrop_alpha must be >= 0, got {rdrop_alpha!r}")
        self.head, self.rdrop_alpha = head, float(rdrop_alpha)

    def logits(self, model: RoFormerSim, enc: Encoding, passes: int = 1) -> list[torch.Tensor]:
        """Head logits (unmasked) of the pairs in ``enc``, once per dropout pass."""
        ids, types, att = enc.input_ids, enc.token_type_ids, enc.attention_mask
        if passes == 2:
            ids, types, att = duplicate_batch((ids, types, att), "concat")
        pooled = model(ids, types, att, mask="bidirectional").pooled
        logits = self.head(pooled[0::2], pooled[1::2])
        return list(split_outputs(logits, "concat")) if passes == 2 else [logits]

    def backward(self, model: RoFormerSim, batch: PairBatch, ctx: StepContext) -> dict[str, float]:
        if ctx.world != 1:
            raise InputError("supervised training runs in one process (launch it without torchrun)")
        enc = batch.encoding.to(ctx.device)
        labels, tasks = batch.labels.to(ctx.device), batch.tasks.to(ctx.device)
        autocast = (torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)
                    if ctx.autocast_dtype is not None else torch.autocast(ctx.device.type, enabled=False))
        with autocast:
            logits = self.logits(model, enc, 2 if self.rdrop_alpha > 0 else 1)
        parts = pair_classification_loss(logits[0], labels, tasks, logits[1] if len(logits) == 2 else None,
                                          self.rdrop_alpha)
        parts["loss"].backward()
        with torch.no_grad():
            acc = (mask_task_logits(logits[0], tasks).argmax(-1) == labels).float().mean()
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["acc"] = float(acc)
        return out
