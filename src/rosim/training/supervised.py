"""Supervised enhancement (spec roformer-sim §D): a Sentence-BERT classifier, then distillation.

Phase 1 — the classifier ("SBERT"). Each pair ``(a, b)`` is encoded sentence by sentence
(``[CLS] s [SEP]``, bidirectional attention, the linear pooler), ``u`` and ``v`` are merged into
``[u, v, |u − v|]`` and one shared ``Dense(3H → 5, no bias)`` head scores five classes:

====  =====================  ==================================
 id    task                   meaning
====  =====================  ==================================
 0     binary                 not similar (label 0)
 1     binary                 similar (label 1)
 2     NLI                    contradiction
 3     NLI                    entailment
 4     NLI                    neutral
====  =====================  ==================================

The cross-entropy is *task-masked*: a binary pair's logits 2–4 and an NLI pair's logits 0–1 are
set to −1e12 before the softmax, so each pair is a 2-way or a 3-way problem on one head. When both
binary and NLI data are given, the stream alternates between them (exactly 1 : 1). Scored data
(STS-B 0–5) is binarised with a threshold (``label = score > threshold``; the reference uses 2.5
for STS-B). With ``rdrop_alpha > 0`` every pair is run twice (two dropout masks) and the loss is
:func:`rosim.training.rdrop.rdrop_loss` (``½ (CE1 + CE2) + (α/2) · SKL``). At test time the vectors
are still compared by cosine: the head only shapes the encoder.

Phase 2 — distillation back into a generation-capable model (stage 2 of the weak-supervision
recipe, with the phase-1 model as a :class:`~rosim.training.teachers.RosimTeacher`): the student
(by default the model phase 1 started from) learns the teacher's cosine matrix (λ = 100) on the
weak-supervision corpus while keeping its generation loss, so ``similar`` still works.

Input files:

* pairs: ``text_a<TAB>text_b<TAB>label`` (the files of ``../shared/data``): labels 0/1, or scores
  with a ``threshold``;
* NLI: JSON lines ``{"sentence1", "sentence2", "gold_label"}`` with ``gold_label`` one of
  entailment / neutral / contradiction (case-insensitive). ``"-"`` (SNLI: no annotator consensus)
  is skipped and counted (``skip_no_consensus = false`` makes it an error); anything else is an
  error naming the file and line.

Config (TOML; paths relative to the file; the other sections as in ``rosim train stage1``)::

    [model]
    init = "runs/default_model/final"      # a rosim checkpoint (with pooler and LM head)
    dropout = 0.2

    [supervised]
    binary = [{path = "STS-B/train.tsv", threshold = 2.5}, {path = "ATEC/valid.tsv"}]
    nli = [{path = "cnsd-snli/train.jsonl"}]
    maxlen = 64
    rdrop_alpha = 0.0                       # > 0: R-Drop (Su uses 4)

    [train]                                 # phase 1
    out_dir = "runs/supervised"
    steps = 1000
    batch_size = 64                         # rows: two per pair
    lr = 2e-5

    [distill]                               # optional phase 2 = stage 2 with this model as teacher
    data = {sources = [{path = "pairs.jsonl"}]}
    train = {steps = 500, batch_size = 64, lr = 1e-5}   # out_dir defaults to <out_dir>/distill

Phase 1 runs in one process (``device`` may be a GPU); it saves resumable checkpoints like the
other stages (model + ``pair_head.safetensors`` + optimiser, data position and random states) and
``out_dir/final``. Phase 2 is the ordinary stage-2 trainer (resumable, data parallel).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rosim.errors import DataError, InputError
from rosim.modeling.model import RoFormerSim
from rosim.textio import iter_lines
from rosim.tokenization.tokenizer import CharTokenizer, Encoding
from rosim.training.config import SupervisedConfig, SupervisedSection, TrainConfig, config_to_dict
from rosim.training.rdrop import duplicate_batch, rdrop_loss, split_outputs
from rosim.training.stages import Objective, StepContext

log = logging.getLogger(__name__)

NUM_CLASSES = 5
CLASS_NAMES = ("binary:0", "binary:1", "contradiction", "entailment", "neutral")
NLI_LABELS = {"contradiction": 2, "entailment": 3, "neutral": 4}
TASKS = ("binary", "nli")
TASK_CLASSES = {"binary": (0, 1), "nli": (2, 3, 4)}
MASK_VALUE = -1e12  # bert4keras' K.infinity(): a finite "minus infinity" keeps every loss finite
HEAD_FILE = "pair_head.safetensors"


# ============================================================================================
# reading labelled data
# ============================================================================================
@dataclass
class LabelledPairs:
    """Pairs of one task: ``texts_a[i]``, ``texts_b[i]`` with class id ``labels[i]`` (see the table)."""

    task: str  # "binary" or "nli"
    texts_a: list[str]
    texts_b: list[str]
    labels: np.ndarray  # int64 class ids 0..4
    path: str = ""
    skipped: int = 0  # NLI records with gold_label "-" that were skipped

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"task must be 'binary' or 'nli', got {self.task!r}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (len(self.texts_a) == len(self.texts_b) == len(self.labels)):
            raise InputError(f"{len(self.texts_a)} texts_a, {len(self.texts_b)} texts_b, {len(self.labels)} labels")
        allowed = TASK_CLASSES[self.task]
        if len(self.labels) and not np.isin(self.labels, allowed).all():
            bad = int(self.labels[~np.isin(self.labels, allowed)][0])
            raise InputError(f"{self.task} pairs take classes {allowed}, got {bad}")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def concat(cls, parts: Sequence[LabelledPairs]) -> LabelledPairs:
        if not parts:
            raise InputError("nothing to concatenate")
        tasks = {p.task for p in parts}
        if len(tasks) != 1:
            raise InputError(f"cannot pool pairs of different tasks {sorted(tasks)}")
        return cls(parts[0].task, [t for p in parts for t in p.texts_a], [t for p in parts for t in p.texts_b],
                   np.concatenate([p.labels for p in parts]), ", ".join(p.path for p in parts),
                   sum(p.skipped for p in parts))


def read_pair_file(path: str | os.PathLike, threshold: float | None = None) -> LabelledPairs:
    """Read ``text_a<TAB>text_b<TAB>label`` lines as binary pairs.

    Without ``threshold`` every label must be 0 or 1. With it, labels are scores and become
    ``score > threshold`` (STS-B: 2.5). Malformed lines, labels outside the set and empty files are
    errors that name the file (and line).
    """
    from rosim.evaluation.sts import read_sts

    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                  or not math.isfinite(threshold)):
        raise InputError(f"threshold must be a finite number, got {threshold!r}")
    data = read_sts(path)  # format errors name file:line; an empty file is an InputError
    scores = data.labels
    if threshold is None:
        bad = ~np.isin(scores, (0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}:{data.line_numbers[i]}: label {scores[i]:g} is not 0 or 1; for scored data "
                "(e.g. STS-B 0-5) give a threshold (label = score > threshold)"
            )
        labels = scores.astype(np.int64)
    else:
        labels = (scores > threshold).astype(np.int64)
    if len(np.unique(labels)) < 2:
        log.warning("%s: every pair has label %d%s", path, int(labels[0]),
                    "" if threshold is None else f" at threshold {threshold}")
    return LabelledPairs("binary", data.texts_a, data.texts_b, labels, str(path))


def read_nli_file(path: str | os.PathLike, *, skip_no_consensus: bool = True) -> LabelledPairs:
    """Read NLI JSON lines ``{"sentence1", "sentence2", "gold_label"}``.

    ``gold_label`` is entailment, neutral or contradiction (case and surrounding spaces ignored).
    ``"-"`` marks pairs without annotator consensus: skipped (and counted in ``skipped``) unless
    ``skip_no_consensus`` is False. Any other label, a missing or empty sentence, a line that is not
    a JSON object, or a file without usable records raises an error naming the file and line.
    """
    a, b, labels, skipped = [], [], [], 0
    for number, line in iter_lines(path):
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with sentence1, sentence2, gold_label")
        for key in ("sentence1", "sentence2", "gold_label"):
            if key not in obj:
                raise DataError(f"{where}: missing key {key!r} (an NLI record has sentence1, sentence2, gold_label)")
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
        raw = obj["gold_label"]
        label = raw.strip().lower()
        if label == "-":
            if not skip_no_consensus:
                raise DataError(f"{where}: gold_label '-' (no annotator consensus); set skip_no_consensus = true to skip such pairs")
            skipped += 1
            continue
        if label not in NLI_LABELS:
            guess = difflib.get_close_matches(label, list(NLI_LABELS), n=1, cutoff=0.6)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise DataError(f"{where}: gold_label {raw!r} is not one of entailment, neutral, contradiction{hint}")
        s1, s2 = obj["sentence1"], obj["sentence2"]
        if not s1.strip() or not s2.strip():
            raise DataError(f"{where}: {'sentence1' if not s1.strip() else 'sentence2'} is empty")
        a.append(s1)
        b.append(s2)
        labels.append(NLI_LABELS[label])
    if not labels:
        why = f" ({skipped} records had gold_label '-')" if skipped else ""
        raise InputError(f"{path} contains no usable NLI pairs{why}")
    if skipped:
        log.info("%s: skipped %d pairs with gold_label '-'", path, skipped)
    return LabelledPairs("nli", a, b, np.asarray(labels, np.int64), str(path), skipped)


# ============================================================================================
# the head and the loss
# ============================================================================================
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


# ============================================================================================
# batches
# ============================================================================================
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


class PairMixer:
    """An endless, resumable stream of labelled pairs; binary and NLI pairs alternate (1 : 1).

    Each task's pairs (all its files pooled) are visited in a fresh random order every epoch; the
    order of epoch ``e`` of task ``k`` is ``default_rng([seed, k, e]).permutation(n)``, so the
    position is three small numbers per task (``state_dict``).
    """

    def __init__(self, binary: LabelledPairs | None, nli: LabelledPairs | None, *, seed: int = 0):
        self.sets = [s for s in (binary, nli) if s is not None and len(s)]
        if not self.sets:
            raise InputError("no labelled pairs: give [supervised] binary and/or nli files")
        self.seed = seed
        self.state = [{"epoch": 0, "pos": 0} for _ in self.sets]
        self.turn = 0
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # task -> (epoch, its order)

    def _order(self, k: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(k)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, k, epoch]).permutation(len(self.sets[k])))
            self._orders[k] = cached
        return cached[1]

    def next_pair(self) -> tuple[str, str, int, int]:
        k = self.turn % len(self.sets)
        self.turn += 1
        st, data = self.state[k], self.sets[k]
        i = int(self._order(k, st["epoch"])[st["pos"]])
        st["pos"] += 1
        if st["pos"] == len(data):
            st["epoch"], st["pos"] = st["epoch"] + 1, 0
        return data.texts_a[i], data.texts_b[i], int(data.labels[i]), TASKS.index(data.task)

    def next_pairs(self, n: int) -> list[tuple[str, str, int, int]]:
        return [self.next_pair() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"tasks": [s.task for s in self.sets], "sizes": [len(s) for s in self.sets],
                "state": [dict(s) for s in self.state], "turn": self.turn}

    def load_state_dict(self, d: dict) -> None:
        mine = {"tasks": [s.task for s in self.sets], "sizes": [len(s) for s in self.sets]}
        if d.get("tasks") != mine["tasks"] or d.get("sizes") != mine["sizes"]:
            raise InputError(f"the data position was saved for {d.get('tasks')} sets of sizes {d.get('sizes')}, "
                             f"but this run has {mine['tasks']} of sizes {mine['sizes']}: the data changed")
        self.state = [{"epoch": int(s["epoch"]), "pos": int(s["pos"])} for s in d["state"]]
        self.turn = int(d["turn"])


# ============================================================================================
# the objective
# ============================================================================================
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


def load_labelled_data(section: SupervisedSection) -> tuple[LabelledPairs | None, LabelledPairs | None]:
    """Read every file of ``[supervised]``: (binary pairs pooled, NLI pairs pooled), None where absent."""
    binary = [read_pair_file(f.path, f.threshold) for f in section.binary]
    nli = [read_nli_file(f.path, skip_no_consensus=section.skip_no_consensus) for f in section.nli]
    return (LabelledPairs.concat(binary) if binary else None, LabelledPairs.concat(nli) if nli else None)


# ============================================================================================
# phase 1: the trainer
# ============================================================================================
class SupervisedTrainer:
    """Phase 1: trains the encoder and the pair head; resumable like :class:`~rosim.training.trainer.Trainer`.

    ``out_dir`` holds ``checkpoints/step-N`` (model + ``pair_head.safetensors`` + training state),
    ``final/`` (the same without training state), ``log.jsonl`` and ``train_config.json``.
    """

    def __init__(self, cfg: SupervisedConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        from rosim.checkpoints.io import load_checkpoint
        from rosim.training.trainer import build_model, list_checkpoints, resolve_device, set_dropout

        cfg.validate()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("supervised training (phase 1) runs in one process: launch it without torchrun")
        self.cfg, self.quiet, self.on_step = cfg, quiet, on_step
        t, s = cfg.train, cfg.supervised
        self.device = resolve_device(t.device)
        precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.out_dir = cfg.out_dir
        binary, nli = load_labelled_data(s)  # read (and check) the data before anything else
        self.sizes = {"binary": 0 if binary is None else len(binary), "nli": 0 if nli is None else len(nli)}

        existing = list_checkpoints(self.out_dir)
        self.resume_from = existing[-1][1] if (resume and existing) else None
        if existing and not resume and not overwrite:
            raise InputError(f"{self.out_dir} already holds checkpoints (latest {existing[-1][1].name}); "
                             "pass --resume to continue that run or --overwrite to start again")
        if overwrite and not resume:
            for sub in ("checkpoints", "final"):
                shutil.rmtree(self.out_dir / sub, ignore_errors=True)
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)

        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        torch.manual_seed(t.seed)
        if self.resume_from is not None:
            self.model, self.tokenizer, _ = load_checkpoint(self.resume_from)
            if cfg.model.dropout is not None:
                set_dropout(self.model, cfg.model.dropout)
        else:
            self.model, self.tokenizer = build_model(TrainConfig(model=cfg.model))
        if not self.model.has_sentence_vector:
            raise InputError("supervised training needs a model with a pooler")
        hidden = self.model.config.hidden_size
        self.head = (PairHead.load(self.resume_from / HEAD_FILE, hidden) if self.resume_from is not None
                     else PairHead(hidden))
        torch.manual_seed(t.seed + 1)  # the dropout stream
        self.model.to(self.device).train()
        self.head.to(self.device).train()
        self.optimizer = self._optimizer()
        self.mixer = PairMixer(binary, nli, seed=t.seed)
        self.objective = SupervisedObjective(self.head, s.rdrop_alpha)
        self.step = 0
        if self.resume_from is not None:
            self._restore(self.resume_from)

    def _optimizer(self) -> torch.optim.Optimizer:
        t, s = self.cfg.train, self.cfg.supervised
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        head_lr = s.head_lr if s.head_lr is not None else t.lr
        groups = [{"params": decay, "weight_decay": t.weight_decay, "base_lr": t.lr},
                  {"params": no_decay, "weight_decay": 0.0, "base_lr": t.lr},
                  {"params": list(self.head.parameters()), "weight_decay": t.weight_decay, "base_lr": head_lr}]
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)

    def parameters(self):
        yield from self.model.parameters()
        yield from self.head.parameters()

    # ---------------------------------------------------------------- checkpoints
    def _write(self, directory: Path, *, state: bool) -> None:
        from rosim.checkpoints.io import atomic_directory, save_checkpoint
        from rosim.training.trainer import save_training_state

        meta = {"stage": "supervised", "step": self.step, "classes": list(CLASS_NAMES)}
        with atomic_directory(directory) as tmp:
            save_checkpoint(tmp, self.model, self.tokenizer, metadata=meta)
            self.head.save(tmp / HEAD_FILE)
            if state:
                cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else None
                save_training_state(tmp, step=self.step, optimizer=self.optimizer, data_state=self.mixer.state_dict(),
                                    torch_rng_states=[torch.get_rng_state()], cuda_rng_states=cuda,
                                    extra={"stage": "supervised", "seed": self.cfg.train.seed})

    def save(self) -> Path:
        from rosim.training.trainer import list_checkpoints

        target = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        self._write(target, state=True)
        for _, old in list_checkpoints(self.out_dir)[: -self.cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def _restore(self, directory: Path) -> None:
        from rosim.errors import CheckpointError
        from rosim.training.trainer import (
            _set_rng_state_json,
            load_training_state,
            restore_optimizer,
            trim_log,
        )

        state, tensors = load_training_state(directory)
        if state.get("stage") != "supervised":
            raise CheckpointError(f"{directory} is a {state.get('stage')} checkpoint; cannot resume supervised training from it")
        restore_optimizer(self.optimizer, state, tensors)
        self.mixer.load_state_dict(state["data"])
        _set_rng_state_json(state["rng"])
        torch.set_rng_state(tensors["rng.torch.0"])
        if self.device.type == "cuda" and "rng.cuda.0" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda.0"], self.device)
        self.step = int(state["step"])
        trim_log(self.out_dir / "log.jsonl", self.step)
        log.info("resumed from %s at step %d", directory, self.step)

    # ---------------------------------------------------------------- the loop
    def train(self) -> Path:
        """Run until ``steps``; returns ``out_dir/final`` (a rosim checkpoint + the pair head)."""
        from tqdm.auto import tqdm

        from rosim.training.trainer import lr_factor

        t, s = self.cfg.train, self.cfg.supervised
        ctx = StepContext(device=self.device, autocast_dtype=self.autocast_dtype)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record_cfg = {"stage": "supervised", "data_sizes": self.sizes, **config_to_dict(self.cfg)}
        tmp = self.out_dir / ".train_config.json.tmp"
        tmp.write_text(json.dumps(record_cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.out_dir / "train_config.json")
        show = not self.quiet and sys.stderr.isatty()
        bar = tqdm(total=t.steps, initial=self.step, disable=not show, desc="supervised", unit="step", dynamic_ncols=True)
        pairs_per_batch = t.batch_size // 2
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as log_file:
            try:
                while self.step < t.steps:
                    batch = encode_pairs_batch(self.tokenizer, self.mixer.next_pairs(pairs_per_batch), s.maxlen)
                    factor = lr_factor(self.step, t.steps, t.warmup_steps, t.schedule)
                    for group in self.optimizer.param_groups:
                        group["lr"] = group["base_lr"] * factor
                    self.optimizer.zero_grad(set_to_none=True)
                    parts = self.objective.backward(self.model, batch, ctx)
                    if t.clip_norm > 0:
                        parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(self.parameters()), t.clip_norm))
                    if not math.isfinite(parts["loss"]):
                        raise InputError(f"step {self.step + 1}: the loss is {parts['loss']}; lower lr or check the data")
                    self.optimizer.step()
                    self.step += 1
                    window_steps += 1
                    for k, v in parts.items():
                        window[k] = window.get(k, 0.0) + v
                    bar.update(1)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        elapsed = time.perf_counter() - window_start
                        record = {"step": self.step, "lr": t.lr * factor,
                                  **{k: v / window_steps for k, v in window.items()},
                                  "pairs_per_s": window_steps * pairs_per_batch / max(elapsed, 1e-9)}
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                        bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "kl", "acc") if k in record})
                        if self.on_step is not None:
                            self.on_step(self.step, record)
                        window, window_steps, window_start = {}, 0, time.perf_counter()
                    if self.step % t.save_every == 0 or self.step == t.steps:
                        self.save()
            finally:
                bar.close()
        self.model.eval()
        self.head.eval()
        final = self.out_dir / "final"
        self._write(final, state=False)
        return final


# ============================================================================================
# both phases, and using the result
# ============================================================================================
def train_supervised(cfg: SupervisedConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                     distill: bool = True) -> dict[str, Path]:
    """Phase 1 (SBERT) and, when the config has ``[distill]`` and ``distill`` is true, phase 2.

    Returns ``{"supervised": out_dir/final}`` plus ``{"distilled": <distill out_dir>/final}``.
    """
    from rosim.training.trainer import train

    cfg.validate()
    out = {"supervised": SupervisedTrainer(cfg, resume=resume, overwrite=overwrite, quiet=quiet).train()}
    if distill and cfg.distill is not None:
        out["distilled"] = train(cfg.distill_config(), "stage2", resume=resume, overwrite=overwrite, quiet=quiet)
    return out


def load_pair_classifier(directory: str | os.PathLike, *, device: str = "cpu") -> tuple[RoFormerSim, CharTokenizer, PairHead]:
    """The phase-1 model, its tokenizer and its pair head (``pair_head.safetensors``)."""
    from rosim.checkpoints.io import load_checkpoint

    model, tokenizer, _ = load_checkpoint(directory, map_location=device)
    if not (Path(directory) / HEAD_FILE).is_file():
        from rosim.errors import CheckpointError

        raise CheckpointError(f"{directory} has no {HEAD_FILE}: it is not the output of supervised training")
    head = PairHead.load(Path(directory) / HEAD_FILE, model.config.hidden_size).to(device).eval()
    return model, tokenizer, head


@torch.no_grad()
def predict_proba(model: RoFormerSim, tokenizer: CharTokenizer, head: PairHead, texts_a: Sequence[str],
                  texts_b: Sequence[str], *, task: str = "binary", maxlen: int = 64, batch_size: int = 64) -> np.ndarray:
    """Class probabilities of the head: ``(N, 2)`` [P(0), P(1)] for binary, ``(N, 3)`` for NLI
    (contradiction, entailment, neutral)."""
    if task not in TASKS:
        raise InputError(f"task must be 'binary' or 'nli', got {task!r}")
    if len(texts_a) != len(texts_b):
        raise InputError(f"got {len(texts_a)} texts_a but {len(texts_b)} texts_b")
    model.eval()
    classes = list(TASK_CLASSES[task])
    out = []
    for i in range(0, len(texts_a), batch_size):
        pairs = [(a, b, 0, TASKS.index(task)) for a, b in zip(texts_a[i:i + batch_size], texts_b[i:i + batch_size],
                                                              strict=True)]
        batch = encode_pairs_batch(tokenizer, pairs, maxlen)
        enc = batch.encoding.to(model.device)
        pooled = model(enc.input_ids, enc.token_type_ids, enc.attention_mask).pooled
        logits = head(pooled[0::2], pooled[1::2]).float()[:, classes]
        out.append(torch.softmax(logits, -1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(classes)), np.float32)
