"""Training a UniVAE: token cross-entropy of the decoder copy, with atomic checkpoints and exact resume.

The objective is one cross-entropy and the data a list of sentences; everything else (AdamW without
decay on biases/LayerNorm, warm-up + linear/cosine schedule, the safe training-state format,
``checkpoints/step-N`` layout and pruning) is the shared :class:`~rosim.training.loop.TrainingLoop`.
Layout of ``out_dir``::

    checkpoints/step-00000200/  a UniVAE directory + training_state.json + training_state.safetensors
    final/                      the UniVAE after the last step
    log.jsonl                   one line per logged step (loss, token accuracy, lr, tokens/s)
    train_config.json           the run's settings and the fingerprint of its sentences

Batches group sentences of similar length (less padding). Exact resume: the data order is a function of (seed, epoch), the vMF noise of (seed, step), and the
dropout stream is the torch random state saved with every checkpoint, so a run killed and resumed
from its last checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import Field

from rosim.errors import InputError
from rosim.training.config import KeywordConfig, ModelSection, Schedule
from rosim.training.loop import LoopSettings, Step, TrainingLoop, make_optimizer, resolve_device
from rosim.univae.config import UniVAEConfig
from rosim.univae.model import UniVAE

log = logging.getLogger(__name__)


class VAETrainConfig(KeywordConfig):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Schedule = "linear"
    clip_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    seed: int = 0
    save_every: int = Field(200, gt=0)
    log_every: int = Field(10, gt=0)
    keep_last: int = Field(2, gt=0)
    device: str = "cpu"
    max_time_s: float | None = Field(None, gt=0)  # stop (with a checkpoint) once this much wall time has passed


def texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def epoch_batches(epoch: int, lengths: Sequence[int], batch_size: int, seed: int, *, pool: int = 50) -> list[list[int]]:
    """The batches of one epoch: a seeded permutation cut into pools of ``pool`` batches, each pool
    sorted by length (less padding), cut into batches, and the batch order shuffled; a remainder
    smaller than a batch is dropped. A pure function of (seed, epoch)."""
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    order = order[: n - n % batch_size]
    batches = []
    span = batch_size * pool
    for s in range(0, len(order), span):
        chunk = sorted(order[s:s + span], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class VAETrainer:
    """``VAETrainer(texts, out_dir, cfg, model=UniVAE(...)).train()``; ``resume=True`` continues the
    latest checkpoint in ``out_dir`` (``model`` may then be None). Runs on the shared
    :class:`~rosim.training.loop.TrainingLoop`."""

    def __init__(self, texts: Sequence[str], out_dir: str | os.PathLike, cfg: VAETrainConfig | None = None, *,
                 model: UniVAE | None = None, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        cfg = cfg or VAETrainConfig()
        cfg.check()
        self.texts, self.cfg = list(texts), cfg
        if len(self.texts) < cfg.batch_size:
            raise InputError(f"{len(self.texts)} sentences are fewer than one batch of {cfg.batch_size}")
        self.fingerprint = texts_fingerprint(self.texts)
        self.device = resolve_device(cfg.device)
        settings = LoopSettings(steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                                clip_norm=cfg.clip_norm, seed=cfg.seed, save_every=cfg.save_every,
                                keep_last=cfg.keep_last, log_every=cfg.log_every, time_limit_s=cfg.max_time_s or 0.0)
        self.loop = TrainingLoop(out_dir, "univae", settings, device=self.device, resume=resume, overwrite=overwrite,
                                 quiet=quiet, on_step=on_step)
        self.out_dir = self.loop.out_dir
        if self.loop.resume_from is not None:
            model = UniVAE.from_pretrained(self.loop.resume_from)
        elif model is None:
            raise InputError("no model to train: pass a UniVAE (or resume a run that has checkpoints)")
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self._lengths = [len(t) for t in self.texts]
        self._plan: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its batches)
        self.loop.prepare([self.model], self.optimizer, save_model=self._save_model,
                          data_state=lambda: {"step": self.step}, load_data_state=lambda state: None,
                          extra_state={"batch_size": cfg.batch_size, "fingerprint": self.fingerprint},
                          check_state=self._check_state)

    @property
    def step(self) -> int:
        return self.loop.step

    def _check_state(self, state: dict, directory: Path) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(f"{directory} was trained on different sentences (fingerprint {state.get('fingerprint')}, "
                             f"now {self.fingerprint}); resume with the same data or start with --overwrite")
        if state.get("seed") != self.cfg.seed or state.get("batch_size") != self.cfg.batch_size:
            raise InputError(f"{directory} was trained with seed={state.get('seed')}, batch_size={state.get('batch_size')}; "
                             "resume with the same values")

    def _save_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory, metadata={"step": self.step})

    def _train_step(self, forward: torch.nn.Module) -> Step:
        """The batch of this step (a function of seed, epoch and position) and its cross-entropy; the
        vMF noise is drawn from a generator seeded by (seed, step)."""
        cfg = self.cfg
        epoch, b = divmod(self.step, len(self.texts) // cfg.batch_size)
        if epoch != self._plan[0]:
            self._plan = (epoch, epoch_batches(epoch, self._lengths, cfg.batch_size, cfg.seed))
        inputs = self.model.build_inputs([self.texts[i] for i in self._plan[1][b]]).to(self.device)
        noise = torch.Generator(device=self.device).manual_seed(cfg.seed * 7_919 + self.step + 1)
        loss, tokens, correct = self.model.loss(inputs, noise=True, generator=noise)
        loss.backward()
        return Step({"loss": loss.item()}, {"tokens": tokens, "correct": correct})

    def save(self) -> Path | None:
        return self.loop.save()

    def train(self) -> Path:
        """Train until ``steps`` (or ``max_time_s``); returns ``out_dir/final``."""
        settings = {"train": self.cfg.model_dump(), "univae": self.model.config.to_dict(),
                    "backbone": self.model.backbone.config.to_dict(), "sentences": len(self.texts),
                    "fingerprint": self.fingerprint}
        return self.loop.run(self._train_step, config=settings, show=("loss", "token_accuracy"), rates=_vae_rates)


def _vae_rates(counts: dict[str, float], seconds: float) -> dict[str, float]:
    return {"token_accuracy": counts["correct"] / max(counts["tokens"], 1), "tokens_per_s": counts["tokens"] / seconds}


def new_univae(backbone: ModelSection, config: UniVAEConfig, texts: Sequence[str]) -> UniVAE:
    """A UniVAE on the backbone that ``backbone`` describes (a checkpoint, or a fresh model whose
    vocabulary is built from ``texts``), built by the trainers' shared :func:`~rosim.training.trainer.build_model`."""
    from rosim.training.trainer import build_model

    model, tokenizer = build_model(backbone, lambda: iter(texts))
    return UniVAE(model, tokenizer, config)


def train_univae(texts: Sequence[str], out_dir: str | os.PathLike, cfg: VAETrainConfig | None = None,
                 **kwargs) -> Path:
    """Build a :class:`VAETrainer` and run it; returns the final model directory."""
    return VAETrainer(texts, out_dir, cfg, **kwargs).train()
