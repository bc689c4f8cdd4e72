"""The trainer: AdamW, clipping, warm-up, atomic checkpoints, exact resume, data parallelism.

Layout of ``out_dir``::

    checkpoints/step-00001000/   a rosim checkpoint (config.json, model.safetensors, vocab.txt)
                                 + training_state.json + training_state.safetensors
    final/                       the model after the last step (a plain rosim checkpoint)
    log.jsonl                    one line per logged step: loss parts, lr, tokens/s
    train_config.json            the resolved configuration

Training state is written in safe formats only: tensors (optimiser moments, torch random states)
in safetensors, everything else (step, learning-rate schedule, data position, Python and NumPy
random states, optimiser hyper-parameters) in JSON. Nothing is unpickled when resuming.

Resuming restores the model, the optimiser, the schedule, every random state and the data
position, so a run killed at any moment and resumed from its last checkpoint ends with the same
weights as an uninterrupted run.

Data parallelism (``torchrun --nproc_per_node N rosim train ...``; gloo on CPU, NCCL on GPU):
every process reads the same data stream and builds the same *global* batch (noise included), then
works on its own contiguous slice of rows. The objectives scale their losses so that the *sum* of
the processes' gradients is the global-batch gradient (the contrastive / distillation parts over
all rows via all-gather), and the trainer all-reduces the gradients with SUM in one flat buffer.
Every process then takes the identical optimiser step. With dropout off, N processes give the
weights of one process on the same global batch, up to float rounding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rosim.checkpoints.io import atomic_directory, load_checkpoint, read_safetensors, save_checkpoint
from rosim.errors import CheckpointError, InputError
from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
from rosim.tokenization.tokenizer import CharTokenizer, build_vocab
from rosim.training.config import TrainConfig, config_to_dict
from rosim.training.data import BatchPrefetcher, MLMBatcher, PairBatcher, PairStream, Source, iter_texts
from rosim.training.stages import MLMObjective, Objective, Stage1Objective, Stage2Objective, StepContext

log = logging.getLogger(__name__)

STATE_JSON, STATE_TENSORS = "training_state.json", "training_state.safetensors"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1); returns (world, rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_world_size(), dist.get_rank()


def all_reduce_gradients(model: torch.nn.Module, world: int) -> None:
    """Sum every parameter's gradient over processes, in one flat buffer."""
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


# --------------------------------------------------------------------------------------------
# optimiser and schedule
# --------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-6):
    """AdamW; biases and LayerNorm weights (every parameter with fewer than 2 dims) get no decay."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# training state (safe formats)
# --------------------------------------------------------------------------------------------
def _rng_state_json() -> dict:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state_json(d: dict) -> None:
    version, state, gauss = d["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_training_state(
    directory: Path,
    *,
    step: int,
    optimizer: torch.optim.Optimizer,
    data_state: dict,
    torch_rng_states: list[torch.Tensor],
    cuda_rng_states: list[torch.Tensor] | None,
    extra: dict,
) -> None:
    """Write ``training_state.json`` + ``training_state.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    opt_scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[name] = value
    for r, s in enumerate(torch_rng_states):
        tensors[f"rng.torch.{r}"] = s.cpu()
    for r, s in enumerate(cuda_rng_states or []):
        tensors[f"rng.cuda.{r}"] = s.cpu()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    state = {
        "version": STATE_VERSION,
        "step": step,
        "optimizer": {"param_groups": groups, "scalars": opt_scalars, "indices": sorted(int(i) for i in opt["state"])},
        "data": data_state,
        "rng": _rng_state_json(),
        "world_size": len(torch_rng_states),
        **extra,
    }
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")


def load_training_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = directory / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {STATE_JSON}: it is not a resumable training checkpoint")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training-state version {state.get('version')!r}, this rosim reads {STATE_VERSION}")
    return state, read_safetensors(directory / STATE_TENSORS)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    saved = state["optimizer"]
    opt_state: dict[int, dict] = {}
    for idx in saved["indices"]:
        entry = dict(saved["scalars"].get(str(idx), {}))
        prefix = f"optimizer.{idx}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                entry[key[len(prefix):]] = value
        opt_state[idx] = entry
    groups = []
    for g in saved["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimiser state does not match the model: {exc}") from None


def trim_log(path: Path, step: int) -> None:
    """Drop the lines of a ``log.jsonl`` written after ``step`` (a resumed run redoes them), atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{x}\n" for x in keep), encoding="utf-8")
    os.replace(tmp, path)


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = out_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and (p / STATE_JSON).is_file():
                try:
                    found.append((int(p.name[5:]), p))
                except ValueError:
                    continue
    return sorted(found)


# --------------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------------
def set_dropout(model: RoFormerSim, p: float) -> None:
    model.config.hidden_dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def build_model(cfg: TrainConfig) -> tuple[RoFormerSim, CharTokenizer]:
    """The starting model: a checkpoint (``[model] init``) or a fresh one (vocab file or built vocab)."""
    m = cfg.model
    if m.init is not None:
        model, tokenizer, report = load_checkpoint(m.init, allow_missing=tuple(m.allow_missing))
        if report.missing:
            log.warning("%s: %s", m.init, report)
    else:
        if m.vocab == "build":
            texts = (t for s in cfg.data.sources for t in iter_texts(s.path, skip_bad_lines=cfg.data.skip_bad_lines))
            tokenizer = CharTokenizer(build_vocab(texts, max_size=m.vocab_size))
        else:
            tokenizer = CharTokenizer.from_file(m.vocab)
        fields = dict(m.config)
        if "vocab_size" in fields and fields["vocab_size"] != len(tokenizer):
            raise InputError(f"[model.config] vocab_size={fields['vocab_size']} but the vocabulary has {len(tokenizer)} tokens")
        fields["vocab_size"] = len(tokenizer)
        known = {f.name for f in dataclasses.fields(RoFormerSimConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise InputError(f"[model.config]: unknown keys {unknown}; allowed keys are {sorted(known)}")
        model = RoFormerSim(RoFormerSimConfig(**fields))
    if not model.has_sentence_vector or model.lm_head is None:
        raise InputError("training needs a model with a pooler and an LM head (with_pooler and with_lm_head true)")
    if m.dropout is not None:
        set_dropout(model, m.dropout)
    return model, tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Runs one stage (``mlm``, ``stage1`` or ``stage2``) from a :class:`TrainConfig`.

    >>> Trainer(load_config("stage1.toml"), "stage1").train()       # doctest: +SKIP
    PosixPath('runs/stage1/final')
    """

    def __init__(
        self,
        cfg: TrainConfig,
        stage: str,
        *,
        resume: bool = False,
        overwrite: bool = False,
        quiet: bool = False,
        teacher=None,
        on_step: Callable[[int, dict], None] | None = None,
    ):
        cfg.validate(stage, teacher_given=teacher is not None)
        self.cfg, self.stage, self.quiet, self.on_step = cfg, stage, quiet, on_step
        t = cfg.train
        self.device = resolve_device(t.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.world, self.rank = init_distributed(self.device)
        if t.batch_size % self.world:
            raise InputError(f"batch_size {t.batch_size} does not split evenly over {self.world} processes")
        if t.chunk_size and t.chunk_size > t.batch_size // self.world:
            raise InputError(f"chunk_size {t.chunk_size} exceeds the {t.batch_size // self.world} rows per process")
        precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.out_dir = Path(t.out_dir)

        existing = list_checkpoints(self.out_dir)
        self.resume_from = existing[-1][1] if (resume and existing) else None
        if existing and not resume:
            if not overwrite:
                raise InputError(
                    f"{self.out_dir} already holds checkpoints (latest {existing[-1][1].name}); "
                    "pass --resume to continue that run or --overwrite to start again"
                )
        if overwrite and not resume and self.rank == 0:
            shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.out_dir / "final", ignore_errors=True)
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)
        self._barrier()

        # seeds first, so a fresh model is initialised identically everywhere
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        torch.manual_seed(t.seed)
        if self.resume_from is not None:
            self.model, self.tokenizer, _ = load_checkpoint(self.resume_from)
            if cfg.model.dropout is not None:
                set_dropout(self.model, cfg.model.dropout)
        else:
            self.model, self.tokenizer = build_model(cfg)
        torch.manual_seed(t.seed + 1000003 * self.rank)  # per-process dropout streams
        self.model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, t.lr, t.weight_decay, t.betas, t.eps)

        d = cfg.data
        self.stream = PairStream(
            [Source(s.path, s.ratio) for s in d.sources], maxlen=d.maxlen, seed=t.seed,
            skip_bad_lines=d.skip_bad_lines, shuffle_buffer=d.shuffle_buffer, single_texts=stage == "mlm",
        )
        if stage == "mlm":
            self.batcher = MLMBatcher(self.tokenizer, maxlen=d.maxlen, word_prob=cfg.noise.word_prob, seed=t.seed)
        else:
            self.batcher = PairBatcher(
                self.tokenizer, maxlen=d.maxlen, noise_row_prob=cfg.noise.row_prob,
                word_prob=cfg.noise.word_prob, seed=t.seed,
            )
        self.objective = self._objective(teacher)
        self.step = 0
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.prefetcher: BatchPrefetcher | None = None
        self._data_state: dict | None = None  # with a prefetcher: the stream position after the last step's draw
        if t.data_workers > 0:
            self.prefetcher = BatchPrefetcher(self.stream, self.batcher, self._draw, workers=t.data_workers,
                                              depth=max(2 * t.data_workers, 4), start_step=self.step)

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

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

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

    def _stop_for_time(self, started: float) -> bool:
        """True once ``time_limit_s`` has passed (every process agrees, rank 0 decides)."""
        limit = self.cfg.train.time_limit_s
        if not limit:
            return False
        flag = torch.tensor([float(time.perf_counter() - started > limit)])
        if self.world > 1:
            if dist.get_backend() == "nccl":
                flag = flag.to(self.device)
            dist.broadcast(flag, 0)
        return bool(flag.item())

    def _gather_rng(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        if self.world == 1:
            return [cpu], None if cuda is None else [cuda]

        def gather(t: torch.Tensor) -> list[torch.Tensor]:
            x = t.to(self.device) if dist.get_backend() == "nccl" else t
            out = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(out, x)
            return [o.cpu() for o in out]

        return gather(cpu), None if cuda is None else gather(cuda)

    def save(self) -> Path | None:
        """Write ``checkpoints/step-N`` atomically (rank 0) and prune to the last ``keep_last``."""
        torch_states, cuda_states = self._gather_rng()  # collective: every rank takes part
        target = self.out_dir / "checkpoints" / f"step-{self.step:08d}"
        if self.rank == 0:
            with atomic_directory(target) as tmp:
                save_checkpoint(tmp, self.model, self.tokenizer, metadata={"stage": self.stage, "step": self.step})
                save_training_state(
                    tmp, step=self.step, optimizer=self.optimizer,
                    data_state=self.stream.state_dict(self._data_state if self.prefetcher is not None else None),
                    torch_rng_states=torch_states, cuda_rng_states=cuda_states,
                    extra={"stage": self.stage, "seed": self.cfg.train.seed},
                )
            for _, old in list_checkpoints(self.out_dir)[: -self.cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return target if self.rank == 0 else None

    def _restore(self, directory: Path) -> None:
        state, tensors = load_training_state(directory)
        if state.get("stage") != self.stage:
            raise CheckpointError(f"{directory} is a {state.get('stage')} checkpoint; cannot resume {self.stage} from it")
        restore_optimizer(self.optimizer, state, tensors)
        self.stream.load_state_dict(state["data"])
        _set_rng_state_json(state["rng"])
        if state["world_size"] == self.world:
            torch.set_rng_state(tensors[f"rng.torch.{self.rank}"])
            key = f"rng.cuda.{self.rank}"
            if self.device.type == "cuda" and key in tensors:
                torch.cuda.set_rng_state(tensors[key], self.device)
        else:
            log.warning("resuming with %d processes instead of %d: dropout random streams start afresh",
                        self.world, state["world_size"])
            torch.manual_seed(self.cfg.train.seed + 1000003 * self.rank + state["step"])
        self.step = int(state["step"])
        self._trim_log()
        if self.rank == 0:
            log.info("resumed from %s at step %d", directory, self.step)

    def _trim_log(self) -> None:
        if self.rank == 0:
            trim_log(self.out_dir / "log.jsonl", self.step)

    # ---------------------------------------------------------------- the loop
    def train(self) -> Path:
        """Run until ``steps``; returns the path of the final model (``out_dir/final``)."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        ctx = StepContext(world=self.world, rank=self.rank, device=self.device,
                          autocast_dtype=self.autocast_dtype, chunk_size=t.chunk_size)
        created = self._created_files() if self.rank == 0 else []
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.out_dir / ".train_config.json.tmp"
            tmp.write_text(json.dumps({"stage": self.stage, **config_to_dict(self.cfg)}, indent=2, ensure_ascii=False),
                           encoding="utf-8")
            os.replace(tmp, self.out_dir / "train_config.json")
        show = not self.quiet and self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=t.steps, initial=self.step, disable=not show, desc=self.stage, unit="step", dynamic_ncols=True)
        log_file = open(self.out_dir / "log.jsonl", "a", encoding="utf-8") if self.rank == 0 else None
        window_tokens, window_start = 0, time.perf_counter()
        window_parts: dict[str, float] = {}
        window_steps = 0
        started = time.perf_counter()
        try:
            while self.step < t.steps:
                if self._stop_for_time(started):
                    log.warning("time limit of %.0f s reached at step %d of %d: stopping", t.time_limit_s, self.step, t.steps)
                    if self.step % t.save_every:
                        self.save()
                    break
                batch = self._next_global_batch()
                tokens = batch.num_tokens
                if isinstance(self.objective, Stage2Objective):
                    self.objective.global_sources = batch.sources
                local = batch.shard(self.rank, self.world) if self.world > 1 else batch
                factor = lr_factor(self.step, t.steps, t.warmup_steps, t.schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = t.lr * factor
                self.optimizer.zero_grad(set_to_none=True)
                parts = self.objective.backward(self.model, local, ctx)
                all_reduce_gradients(self.model, self.world)
                if t.clip_norm > 0:
                    parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm))
                if not math.isfinite(parts["loss"]):
                    raise InputError(f"step {self.step + 1}: the loss is {parts['loss']}; lower lr or check the data")
                self.optimizer.step()
                self.step += 1
                window_tokens += tokens
                window_steps += 1
                for k, v in parts.items():
                    window_parts[k] = window_parts.get(k, 0.0) + v
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, "lr": t.lr * factor,
                              **{k: v / window_steps for k, v in window_parts.items()},
                              "tokens_per_s": window_tokens / max(elapsed, 1e-9), "tokens": window_tokens}
                    if log_file is not None:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "gen", "sim", "distill", "mlm", "rdrop") if k in record})
                    if self.on_step is not None:
                        self.on_step(self.step, record)
                    window_tokens, window_parts, window_steps = 0, {}, 0
                    window_start = time.perf_counter()
                if self.step % t.save_every == 0 or self.step == t.steps:
                    self.save()
        except InputError:
            if self.step == 0 and created:  # unusable data or config before any step: leave no run behind
                if log_file is not None:
                    log_file.close()
                    log_file = None
                _remove_created(created)
            raise
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
            if self.prefetcher is not None:
                self.prefetcher.close()
        final = self.out_dir / "final"
        if self.rank == 0:
            self.model.eval()
            save_checkpoint(final, self.model, self.tokenizer, metadata={"stage": self.stage, "step": self.step})
            self.model.train()
        self._barrier()
        return final

    def _created_files(self) -> list[Path]:
        """What train() is about to create (for removal if the run fails before its first step)."""
        paths = [self.out_dir / name for name in ("train_config.json", "log.jsonl")]
        missing = [p for p in paths if not p.exists()]
        if not self.out_dir.exists():
            missing.append(self.out_dir)
        return missing if self.step == 0 else []

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _remove_created(paths: list[Path]) -> None:
    for p in paths:
        try:
            if p.is_dir():
                p.rmdir()  # only when empty
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def train(cfg: TrainConfig, stage: str, **kwargs) -> Path:
    """Build a :class:`Trainer` and run it; returns the final model directory."""
    trainer = Trainer(cfg, stage, **kwargs)
    try:
        return trainer.train()
    finally:
        trainer.close()
