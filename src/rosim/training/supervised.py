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

Where things are: labelled-data readers and the task mixer in :mod:`rosim.training.labelled`, the
head and its objective in :mod:`rosim.training.pair_head`, using the trained classifier in
:mod:`rosim.training.pair_classifier`; the config models in :mod:`rosim.training.config`.

Phase 1 runs in one process (``device`` may be a GPU); it saves resumable checkpoints like the
other stages (model + ``pair_head.safetensors`` + optimiser, data position and random states) and
``out_dir/final``. Phase 2 is the ordinary stage-2 trainer (resumable, data parallel).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rosim.errors import InputError
from rosim.training.config import SupervisedConfig, config_to_dict
from rosim.training.labelled import PairMixer, load_labelled_data
from rosim.training.loop import Step, TrainingLoop
from rosim.training.pair_head import CLASS_NAMES, HEAD_FILE, PairHead, SupervisedObjective, encode_pairs_batch
from rosim.training.stages import StepContext

log = logging.getLogger(__name__)



class SupervisedTrainer:
    """Phase 1: trains the encoder and the pair head on the shared :class:`~rosim.training.loop.TrainingLoop`.

    ``out_dir`` holds ``checkpoints/step-N`` (model + ``pair_head.safetensors`` + training state),
    ``final/`` (the same without training state), ``log.jsonl`` and ``train_config.json``.
    """

    def __init__(self, cfg: SupervisedConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        from rosim.checkpoints.io import load_checkpoint
        from rosim.training.trainer import (
            autocast_dtype,
            build_model,
            loop_settings,
            resolve_device,
            set_dropout,
        )

        cfg.validate()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("supervised training (phase 1) runs in one process: launch it without torchrun")
        self.cfg = cfg
        t, s = cfg.train, cfg.supervised
        self.device = resolve_device(t.device)
        self.ctx = StepContext(device=self.device, autocast_dtype=autocast_dtype(t.precision, self.device))
        binary, nli = load_labelled_data(s)  # read (and check) the data before anything else
        self.sizes = {"binary": 0 if binary is None else len(binary), "nli": 0 if nli is None else len(nli)}
        self.loop = TrainingLoop(cfg.out_dir, "supervised", loop_settings(t), device=self.device, resume=resume,
                                 overwrite=overwrite, quiet=quiet, on_step=on_step)
        self.out_dir = self.loop.out_dir
        resume_from = self.loop.resume_from
        if resume_from is not None:
            self.model, self.tokenizer, _ = load_checkpoint(resume_from)
            if cfg.model.dropout is not None:
                set_dropout(self.model, cfg.model.dropout)
        else:
            self.model, self.tokenizer = build_model(cfg.model)
        if not self.model.has_sentence_vector:
            raise InputError("supervised training needs a model with a pooler")
        hidden = self.model.config.hidden_size
        self.head = PairHead.load(resume_from / HEAD_FILE, hidden) if resume_from is not None else PairHead(hidden)
        self.loop.seed_dropout(t.seed + 1)
        self.model.to(self.device)
        self.head.to(self.device)
        self.optimizer = self._optimizer()
        self.mixer = PairMixer(binary, nli, seed=t.seed)
        self.objective = SupervisedObjective(self.head, s.rdrop_alpha)
        self.loop.prepare([self.model, self.head], self.optimizer, save_model=self._save_model,
                          data_state=self.mixer.state_dict, load_data_state=self.mixer.load_state_dict)

    @property
    def step(self) -> int:
        return self.loop.step

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW: no decay on biases and LayerNorm weights; the head may have its own learning rate."""
        t, s = self.cfg.train, self.cfg.supervised
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0},
                  {"params": list(self.head.parameters()), "weight_decay": t.weight_decay,
                   "lr": s.head_lr if s.head_lr is not None else t.lr}]
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)

    def _save_model(self, directory: Path) -> None:
        from rosim.checkpoints.io import save_checkpoint

        save_checkpoint(directory, self.model, self.tokenizer,
                        metadata={"stage": "supervised", "step": self.step, "classes": list(CLASS_NAMES)})
        self.head.save(directory / HEAD_FILE)

    def _train_step(self, forward: nn.Module) -> Step:
        pairs = self.cfg.train.batch_size // 2
        batch = encode_pairs_batch(self.tokenizer, self.mixer.next_pairs(pairs), self.cfg.supervised.maxlen)
        return Step(self.objective.backward(forward, batch, self.ctx), {"pairs": pairs})

    def save(self) -> Path | None:
        return self.loop.save()

    def train(self) -> Path:
        """Run until ``steps``; returns ``out_dir/final`` (a rosim checkpoint + the pair head)."""
        config = {"stage": "supervised", "data_sizes": self.sizes, **config_to_dict(self.cfg)}
        return self.loop.run(self._train_step, config=config, show=("loss", "kl", "acc"),
                             rates=lambda counts, seconds: {"pairs_per_s": counts["pairs"] / seconds})


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
