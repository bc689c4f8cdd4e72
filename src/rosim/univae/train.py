"""Training a UniVAE: token cross-entropy of the decoder copy, with atomic checkpoints and exact resume.

The loop is small because the objective is one cross-entropy; checkpointing reuses the rosim trainer's
pieces (AdamW without decay on biases/LayerNorm, warm-up + linear/cosine schedule, the safe
training-state format, ``checkpoints/step-N`` layout and pruning). Layout of ``out_dir``::

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
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import Field

from rosim.errors import CheckpointError, InputError
from rosim.training.config import KeywordConfig, Schedule
from rosim.training.trainer import (
    list_checkpoints,
    load_training_state,
    lr_factor,
    make_optimizer,
    resolve_device,
    restore_optimizer,
    save_training_state,
    trim_log,
)
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
    latest checkpoint in ``out_dir`` (``model`` may then be None)."""

    def __init__(self, texts: Sequence[str], out_dir: str | os.PathLike, cfg: VAETrainConfig | None = None, *,
                 model: UniVAE | None = None, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        cfg = cfg or VAETrainConfig()
        cfg.check()
        self.texts, self.cfg, self.quiet, self.on_step = list(texts), cfg, quiet, on_step
        if len(self.texts) < cfg.batch_size:
            raise InputError(f"{len(self.texts)} sentences are fewer than one batch of {cfg.batch_size}")
        self.out_dir = Path(out_dir)
        self.fingerprint = texts_fingerprint(self.texts)
        existing = list_checkpoints(self.out_dir)
        if existing and not resume and not overwrite:
            raise InputError(f"{self.out_dir} already holds checkpoints (latest {existing[-1][1].name}); "
                             "pass --resume to continue that run or --overwrite to start again")
        if overwrite and not resume:
            shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.out_dir / "final", ignore_errors=True)
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)
            existing = []
        self.device = resolve_device(cfg.device)
        self.step = 0
        torch.manual_seed(cfg.seed)
        resume_from = existing[-1][1] if (resume and existing) else None
        if resume_from is not None:
            model = UniVAE.from_pretrained(resume_from)
        elif model is None:
            raise InputError("no model to train: pass a UniVAE (or resume a run that has checkpoints)")
        self.model = model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        if resume_from is not None:
            self._restore(resume_from)

    # ---------------------------------------------------------------- checkpoints
    def _restore(self, directory: Path) -> None:
        state, tensors = load_training_state(directory)
        if state.get("stage") != "univae":
            raise CheckpointError(f"{directory} is a {state.get('stage')!r} checkpoint, not a UniVAE run")
        if state.get("fingerprint") != self.fingerprint:
            raise InputError(f"{directory} was trained on different sentences (fingerprint {state.get('fingerprint')}, "
                             f"now {self.fingerprint}); resume with the same data or start with --overwrite")
        if state.get("seed") != self.cfg.seed or state.get("batch_size") != self.cfg.batch_size:
            raise InputError(f"{directory} was trained with seed={state.get('seed')}, batch_size={state.get('batch_size')}; "
                             "resume with the same values")
        restore_optimizer(self.optimizer, state, tensors)
        torch.set_rng_state(tensors["rng.torch.0"])
        if self.device.type == "cuda" and "rng.cuda.0" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda.0"], self.device)
        self.step = int(state["step"])
        trim_log(self.out_dir / "log.jsonl", self.step)
        log.info("resumed from %s at step %d", directory, self.step)

    def save(self) -> Path:
        from rosim.checkpoints.io import atomic_directory

        target = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        cuda = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else None
        with atomic_directory(target) as tmp:
            self.model.save_pretrained(tmp, metadata={"step": self.step})
            save_training_state(
                tmp, step=self.step, optimizer=self.optimizer, data_state={"step": self.step},
                torch_rng_states=[torch.get_rng_state()], cuda_rng_states=cuda,
                extra={"stage": "univae", "seed": self.cfg.seed, "batch_size": self.cfg.batch_size,
                       "fingerprint": self.fingerprint},
            )
        for _, old in list_checkpoints(self.out_dir)[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    # ---------------------------------------------------------------- the loop
    def train(self) -> Path:
        """Train until ``steps`` (or ``max_time_s``); returns ``out_dir/final``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        settings = {"train": cfg.model_dump(), "univae": self.model.config.to_dict(),
                    "backbone": self.model.backbone.config.to_dict(), "sentences": len(self.texts),
                    "fingerprint": self.fingerprint}
        tmp = self.out_dir / ".train_config.json.tmp"
        tmp.write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.out_dir / "train_config.json")
        show = not self.quiet and sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, desc="univae", unit="step", dynamic_ncols=True)
        start = time.perf_counter()
        lengths = [len(t) for t in self.texts]
        per_epoch = len(self.texts) // cfg.batch_size
        plan, plan_epoch = [], -1
        window = {"loss": 0.0, "tokens": 0, "correct": 0, "steps": 0, "t0": time.perf_counter()}
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as log_file:
            try:
                while self.step < cfg.steps:
                    epoch, b = divmod(self.step, per_epoch)
                    if epoch != plan_epoch:
                        plan, plan_epoch = epoch_batches(epoch, lengths, cfg.batch_size, cfg.seed), epoch
                    rows = plan[b]
                    inputs = self.model.build_inputs([self.texts[i] for i in rows]).to(self.device)
                    noise = torch.Generator(device=self.device).manual_seed(cfg.seed * 7_919 + self.step + 1)
                    factor = lr_factor(self.step, cfg.steps, cfg.warmup_steps, cfg.schedule)
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.lr * factor
                    self.optimizer.zero_grad(set_to_none=True)
                    loss, tokens, correct = self.model.loss(inputs, noise=True, generator=noise)
                    if not math.isfinite(loss.item()):
                        raise InputError(f"step {self.step + 1}: the loss is {loss.item()}; lower lr or check the data")
                    loss.backward()
                    if cfg.clip_norm > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
                    self.optimizer.step()
                    self.step += 1
                    bar.update(1)
                    window["loss"] += loss.item()
                    window["tokens"] += tokens
                    window["correct"] += correct
                    window["steps"] += 1
                    out_of_time = cfg.max_time_s is not None and time.perf_counter() - start >= cfg.max_time_s
                    last = self.step == cfg.steps or out_of_time
                    if self.step % cfg.log_every == 0 or last:
                        elapsed = time.perf_counter() - window["t0"]
                        record = {"step": self.step, "lr": cfg.lr * factor, "loss": window["loss"] / window["steps"],
                                  "token_accuracy": window["correct"] / max(window["tokens"], 1),
                                  "tokens_per_s": window["tokens"] / max(elapsed, 1e-9)}
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['token_accuracy']:.3f}")
                        if self.on_step is not None:
                            self.on_step(self.step, record)
                        window = {"loss": 0.0, "tokens": 0, "correct": 0, "steps": 0, "t0": time.perf_counter()}
                    if self.step % cfg.save_every == 0 or last:
                        self.save()
                    if out_of_time:
                        log.info("stopping at step %d: max_time_s=%s reached", self.step, cfg.max_time_s)
                        break
            finally:
                bar.close()
        final = self.out_dir / "final"
        self.model.eval()
        self.model.save_pretrained(final, metadata={"step": self.step})
        self.model.train()
        return final


def train_univae(texts: Sequence[str], out_dir: str | os.PathLike, cfg: VAETrainConfig | None = None,
                 **kwargs) -> Path:
    """Build a :class:`VAETrainer` and run it; returns the final model directory."""
    return VAETrainer(texts, out_dir, cfg, **kwargs).train()
