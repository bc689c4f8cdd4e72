"""The stage trainer (``mlm``, ``stage1``, ``stage2``): a model, a data stream and an objective on the
shared :class:`~rosim.training.loop.TrainingLoop` (AdamW, clipping, schedule, atomic checkpoints,
exact resume, data parallelism; layout of ``out_dir`` in :mod:`rosim.training.loop`).

Data parallelism (``torchrun --nproc_per_node N rosim train ...``; gloo on CPU, NCCL on GPU):
every process reads the same data stream and builds the same *global* batch (noise included), then
works on its own contiguous slice of rows. The objectives scale their losses so that the *sum* of
the processes' gradients is the global-batch gradient (the contrastive / distillation parts over
all rows via all-gather), and DDP sums the gradients (:func:`~rosim.training.loop.data_parallel`).
Every process then takes the identical optimiser step. With dropout off, N processes give the
weights of one process on the same global batch, up to float rounding.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from rosim.checkpoints.io import load_checkpoint, save_checkpoint
from rosim.errors import InputError
from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
from rosim.tokenization.tokenizer import CharTokenizer, build_vocab
from rosim.training.config import ModelSection, TrainConfig, TrainSection, config_to_dict
from rosim.training.data import BatchPrefetcher, MLMBatcher, PairBatcher, PairStream, Source, iter_texts
from rosim.training.loop import (  # noqa: F401  (lr_factor, list_checkpoints: re-exported)
    LoopSettings,
    Step,
    TrainingLoop,
    init_distributed,
    list_checkpoints,
    lr_factor,
    make_optimizer,
    resolve_device,
)
from rosim.training.stages import MLMObjective, Objective, Stage1Objective, Stage2Objective, StepContext

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------------
def set_dropout(model: RoFormerSim, p: float) -> None:
    model.config.hidden_dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def build_model(section: ModelSection, texts: Callable[[], Iterable[str]] | None = None) -> tuple[RoFormerSim, CharTokenizer]:
    """The starting model of ``[model]``: a checkpoint (``init``) or a fresh one (a vocab file, or
    ``vocab = "build"``: a vocabulary built from ``texts()``), with ``dropout`` applied."""
    if section.init is not None:
        model, tokenizer, report = load_checkpoint(section.init, allow_missing=tuple(section.allow_missing))
        if report.missing:
            log.warning("%s: %s", section.init, report)
    else:
        if section.vocab == "build":
            if texts is None:
                raise InputError("[model] vocab = \"build\" needs training texts to build the vocabulary from")
            tokenizer = CharTokenizer(build_vocab(texts(), max_size=section.vocab_size))
        else:
            tokenizer = CharTokenizer.from_file(section.vocab)
        fields = dict(section.config)
        if "vocab_size" in fields and fields["vocab_size"] != len(tokenizer):
            raise InputError(f"[model.config] vocab_size={fields['vocab_size']} but the vocabulary has {len(tokenizer)} tokens")
        fields["vocab_size"] = len(tokenizer)
        known = {f.name for f in dataclasses.fields(RoFormerSimConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise InputError(f"[model.config]: unknown keys {unknown}; allowed keys are {sorted(known)}")
        model = RoFormerSim(RoFormerSimConfig(**fields))
    if section.dropout is not None:
        set_dropout(model, section.dropout)
    return model, tokenizer


def loop_settings(t: TrainSection) -> LoopSettings:
    return LoopSettings(steps=t.steps, warmup_steps=t.warmup_steps, schedule=t.schedule, clip_norm=t.clip_norm,
                        seed=t.seed, save_every=t.save_every, keep_last=t.keep_last, log_every=t.log_every,
                        time_limit_s=t.time_limit_s)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for ``bf16`` (and ``auto`` on CUDA), none for ``fp32``."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def token_rates(counts: dict[str, float], seconds: float) -> dict[str, float]:
    return {"tokens_per_s": counts["tokens"] / seconds, "tokens": counts["tokens"]}


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Runs one stage (``mlm``, ``stage1`` or ``stage2``) from a :class:`TrainConfig`.

    >>> Trainer(load_config("stage1.toml"), "stage1").train()       # doctest: +SKIP
    PosixPath('runs/stage1/final')
    """

    def __init__(self, cfg: TrainConfig, stage: str, *, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, teacher=None, on_step: Callable[[int, dict], None] | None = None):
        cfg.validate(stage, teacher_given=teacher is not None)
        self.cfg, self.stage = cfg, stage
        t, d = cfg.train, cfg.data
        self.device = resolve_device(t.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.world, self.rank = init_distributed(self.device)
        if t.batch_size % self.world:
            raise InputError(f"batch_size {t.batch_size} does not split evenly over {self.world} processes")
        if t.chunk_size and t.chunk_size > t.batch_size // self.world:
            raise InputError(f"chunk_size {t.chunk_size} exceeds the {t.batch_size // self.world} rows per process")
        self.ctx = StepContext(world=self.world, rank=self.rank, device=self.device,
                               autocast_dtype=autocast_dtype(t.precision, self.device), chunk_size=t.chunk_size)
        self.loop = TrainingLoop(t.out_dir, stage, loop_settings(t), device=self.device, world=self.world,
                                 rank=self.rank, resume=resume, overwrite=overwrite, quiet=quiet, on_step=on_step)
        self.out_dir = self.loop.out_dir
        if self.loop.resume_from is not None:
            self.model, self.tokenizer, _ = load_checkpoint(self.loop.resume_from)
            if cfg.model.dropout is not None:
                set_dropout(self.model, cfg.model.dropout)
        else:
            self.model, self.tokenizer = build_model(cfg.model, lambda: (
                x for s in d.sources for x in iter_texts(s.path, skip_bad_lines=d.skip_bad_lines)))
        if not self.model.has_sentence_vector or self.model.lm_head is None:
            raise InputError("training needs a model with a pooler and an LM head (with_pooler and with_lm_head true)")
        self.loop.seed_dropout(t.seed + 1000003 * self.rank)  # per-process dropout streams
        self.model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, t.lr, t.weight_decay, t.betas, t.eps)
        self.stream = PairStream(
            [Source(s.path, s.ratio) for s in d.sources], maxlen=d.maxlen, seed=t.seed,
            skip_bad_lines=d.skip_bad_lines, shuffle_buffer=d.shuffle_buffer, single_texts=stage == "mlm",
        )
        if stage == "mlm":
            self.batcher = MLMBatcher(self.tokenizer, maxlen=d.maxlen, word_prob=cfg.noise.word_prob, seed=t.seed)
        else:
            self.batcher = PairBatcher(self.tokenizer, maxlen=d.maxlen, noise_row_prob=cfg.noise.row_prob,
                                       word_prob=cfg.noise.word_prob, seed=t.seed)
        self.objective = self._objective(teacher)
        self.prefetcher: BatchPrefetcher | None = None
        self._data_state: dict | None = None  # with a prefetcher: the stream position after the last step's draw
        self.loop.prepare([self.model], self.optimizer, save_model=self._save_model, data_state=self._stream_state,
                          load_data_state=self.stream.load_state_dict)
        if t.data_workers > 0:
            self.prefetcher = BatchPrefetcher(self.stream, self.batcher, self._draw, workers=t.data_workers,
                                              depth=max(2 * t.data_workers, 4), start_step=self.step)

    @property
    def step(self) -> int:
        return self.loop.step

    # ---------------------------------------------------------------- pieces
    def _objective(self, teacher) -> Objective:
        loss = self.cfg.loss
        if self.stage == "mlm":
            return MLMObjective()
        if self.stage == "stage1":
            return Stage1Objective(scale=loss.scale, gen_weight=loss.gen_weight, sim_weight=loss.sim_weight,
                                   rdrop_alpha=loss.rdrop_alpha)
        if teacher is None:
            from rosim.training.teachers import make_teacher

            tc = self.cfg.teacher
            teacher = make_teacher(tc.kind, tc.path, maxlen=tc.maxlen, batch_size=tc.batch_size, device=str(self.device))
        return Stage2Objective(teacher, weight=loss.distill_weight, gen_weight=loss.gen_weight,
                               rdrop_alpha=loss.rdrop_alpha)

    def _draw(self):
        """The items (texts or pairs) of the next global batch, from the stream."""
        t = self.cfg.train
        if self.stage == "mlm":
            return self.stream.next_texts(t.batch_size)
        return [self.stream.next_pair() for _ in range(t.batch_size // 2)]

    def _next_global_batch(self):
        if self.prefetcher is not None:
            batch, self._data_state = self.prefetcher.next()
            return batch
        return self.batcher(self._draw(), self.step)

    def _stream_state(self) -> dict:
        return self.stream.state_dict(self._data_state if self.prefetcher is not None else None)

    def _save_model(self, directory: Path) -> None:
        save_checkpoint(directory, self.model, self.tokenizer, metadata={"stage": self.stage, "step": self.step})

    def _train_step(self, forward: torch.nn.Module) -> Step:
        batch = self._next_global_batch()
        local = batch.shard(self.rank, self.world) if self.world > 1 else batch
        return Step(self.objective.backward(forward, local, self.ctx), {"tokens": batch.num_tokens})

    # ---------------------------------------------------------------- running
    def save(self) -> Path | None:
        """Write ``checkpoints/step-N`` now (every process must call it)."""
        return self.loop.save()

    def train(self) -> Path:
        """Run until ``steps``; returns the path of the final model (``out_dir/final``)."""
        try:
            return self.loop.run(self._train_step, config={"stage": self.stage, **config_to_dict(self.cfg)},
                                 rates=token_rates, show=("loss", "gen", "sim", "distill", "mlm", "rdrop"))
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.loop.close()


def train(cfg: TrainConfig, stage: str, **kwargs) -> Path:
    """Build a :class:`Trainer` and run it; returns the final model directory."""
    trainer = Trainer(cfg, stage, **kwargs)
    try:
        return trainer.train()
    finally:
        trainer.close()
