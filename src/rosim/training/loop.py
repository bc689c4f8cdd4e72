"""The one training loop: what every trainer (stages, supervised, UniVAE) shares.

A trainer builds its model, its data source and its objective; :class:`TrainingLoop` owns the rest:

* the output guard (a folder that already holds checkpoints needs ``resume`` or ``overwrite``),
* seeding, and exact resume: model, optimiser, schedule, every random state and the data position,
* the learning-rate schedule (warm-up, then constant / linear / cosine) as a
  :class:`torch.optim.lr_scheduler.LambdaLR` whose state is checkpointed,
* data parallelism: the forward module is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`
  with a communication hook that *sums* the gradients (the objectives scale their losses so that
  the sum over processes is the global-batch gradient),
* clipping, the finite-loss check, logging windows (``log.jsonl``, progress bar, ``on_step``),
  checkpoints every ``save_every`` steps pruned to ``keep_last``, a time limit, and the final model.

Layout of ``out_dir``::

    checkpoints/step-00001000/   the model (written by the trainer's ``save_model``)
                                 + training_state.json + training_state.safetensors
    final/                       the model after the last step
    log.jsonl                    one line per logged step
    train_config.json            the resolved configuration

Training state is written in safe formats only: tensors (optimiser moments, torch random states)
in safetensors, everything else (step, schedule, data position, Python and NumPy random states,
optimiser hyper-parameters) in JSON. Nothing is unpickled when resuming. Every file and folder is
written atomically (:func:`rosim.textio.atomic_write`, :func:`rosim.textio.atomic_directory`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rosim.checkpoints.io import read_safetensors
from rosim.errors import CheckpointError, InputError
from rosim.textio import atomic_directory, atomic_write

log = logging.getLogger(__name__)

STATE_JSON, STATE_TENSORS = "training_state.json", "training_state.safetensors"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# devices and processes
# --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA of this process's LOCAL_RANK if any, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
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


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1); returns (world, rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size(), dist.get_rank()


def _sum_gradients_hook(group, bucket):
    """DDP communication hook: all-reduce a gradient bucket with SUM (DDP's default averages)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in DDP that sums gradients over processes (gloo on CPU, NCCL on GPU)."""
    ddp_class = nn.parallel.DistributedDataParallel
    # buffers (rotary tables) are the same everywhere: no broadcast before each forward
    quiet_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp_class).parameters
                     else {"broadcast_buffers": False})
    ddp = ddp_class(module, device_ids=[device.index] if device.type == "cuda" else None, **quiet_buffers)
    ddp.register_comm_hook(None, _sum_gradients_hook)
    return ddp


# --------------------------------------------------------------------------------------------
# optimiser and schedule
# --------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-6):
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


def lr_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int, schedule: str):
    """:class:`LambdaLR` of :func:`lr_factor`: each group's lr is its initial lr times the factor."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup, schedule))


# --------------------------------------------------------------------------------------------
# training state (safe formats)
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
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
        **({"scheduler": scheduler.state_dict()} if scheduler is not None else {}),
        **extra,
    }
    save_file(tensors, str(directory / STATE_TENSORS))
    with atomic_write(directory / STATE_JSON) as f:
        f.write(json.dumps(state, ensure_ascii=False))


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


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """The schedule's position; checkpoints written before it was saved are replayed to their step."""
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(int(state["step"])):
            scheduler.step()


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
    with atomic_write(path) as f:
        f.write("".join(f"{x}\n" for x in keep))


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
# the loop
# --------------------------------------------------------------------------------------------
@dataclass
class LoopSettings:
    """The knobs of the loop (from ``[train]`` or a trainer's own config)."""

    steps: int
    warmup_steps: int = 0
    schedule: str = "constant"
    clip_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    time_limit_s: float = 0.0  # > 0: stop (checkpoint + final) once training has run this long


@dataclass
class Step:
    """What a trainer's step function returns: loss parts (averaged over a logging window, ``loss``
    among them) and counts (summed over the window, e.g. tokens)."""

    parts: dict[str, float]
    counts: dict[str, float]


class TrainingLoop:
    """The loop of one run. ``TrainingLoop(...)`` checks the output folder and seeds; the trainer then
    builds its model (from :attr:`resume_from` when resuming), calls :meth:`prepare`, and :meth:`run`."""

    def __init__(self, out_dir: str | os.PathLike, stage: str, settings: LoopSettings, *, device: torch.device,
                 world: int = 1, rank: int = 0, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        self.out_dir, self.stage, self.settings = Path(out_dir), stage, settings
        self.device, self.world, self.rank = device, world, rank
        self.quiet, self.on_step = quiet, on_step
        existing = list_checkpoints(self.out_dir)
        self.resume_from: Path | None = existing[-1][1] if (resume and existing) else None
        if existing and not resume and not overwrite:
            raise InputError(f"{self.out_dir} already holds checkpoints (latest {existing[-1][1].name}); "
                             "pass --resume to continue that run or --overwrite to start again")
        if overwrite and not resume and rank == 0:
            shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.out_dir / "final", ignore_errors=True)
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)
        self.barrier()
        seed_everything(settings.seed)  # first, so a fresh model is initialised identically everywhere
        self._dropout_seed = settings.seed
        self.step = 0

    # ---------------------------------------------------------------- set-up
    def prepare(self, modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer, *,
                save_model: Callable[[Path], None], data_state: Callable[[], dict],
                load_data_state: Callable[[dict], None], extra_state: dict | None = None,
                check_state: Callable[[dict, Path], None] | None = None) -> None:
        """Take the trained modules (the first one is the forward module, wrapped in DDP when there are
        several processes), the optimiser and the data position; resume when :attr:`resume_from` is set.

        ``save_model(directory)`` writes the model files of a checkpoint; ``extra_state`` is stored in
        every checkpoint and ``check_state(state, directory)`` may refuse to resume from one.
        """
        self.modules, self.optimizer = list(modules), optimizer
        self.save_model, self.data_state, self.extra_state = save_model, data_state, dict(extra_state or {})
        for m in self.modules:
            m.to(self.device).train()
        self.forward = data_parallel(self.modules[0], self.device) if self.world > 1 else self.modules[0]
        s = self.settings
        self.scheduler = lr_schedule(optimizer, s.steps, s.warmup_steps, s.schedule)
        if self.resume_from is not None:
            self._restore(self.resume_from, load_data_state, check_state)

    def seed_dropout(self, seed: int) -> None:
        """Seed this process's torch stream (dropout): a resumed run restores the saved state instead,
        or, with another number of processes, restarts from ``seed + step``."""
        torch.manual_seed(seed)
        self._dropout_seed = seed

    def parameters(self):
        for m in self.modules:
            yield from m.parameters()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ---------------------------------------------------------------- checkpoints
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
                self.save_model(tmp)
                save_training_state(
                    tmp, step=self.step, optimizer=self.optimizer, scheduler=self.scheduler,
                    data_state=self.data_state(), torch_rng_states=torch_states, cuda_rng_states=cuda_states,
                    extra={"stage": self.stage, "seed": self.settings.seed, **self.extra_state},
                )
            for _, old in list_checkpoints(self.out_dir)[: -self.settings.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return target if self.rank == 0 else None

    def _restore(self, directory: Path, load_data_state: Callable[[dict], None],
                 check_state: Callable[[dict, Path], None] | None) -> None:
        state, tensors = load_training_state(directory)
        if state.get("stage") != self.stage:
            raise CheckpointError(f"{directory} is a {state.get('stage')} checkpoint; cannot resume {self.stage} from it")
        if check_state is not None:
            check_state(state, directory)
        restore_optimizer(self.optimizer, state, tensors)
        restore_scheduler(self.scheduler, state)
        load_data_state(state["data"])
        _set_rng_state_json(state["rng"])
        if state["world_size"] == self.world:
            torch.set_rng_state(tensors[f"rng.torch.{self.rank}"])
            key = f"rng.cuda.{self.rank}"
            if self.device.type == "cuda" and key in tensors:
                torch.cuda.set_rng_state(tensors[key], self.device)
        else:
            log.warning("resuming with %d processes instead of %d: dropout random streams start afresh",
                        self.world, state["world_size"])
            torch.manual_seed(self._dropout_seed + state["step"])
        self.step = int(state["step"])
        if self.rank == 0:
            trim_log(self.out_dir / "log.jsonl", self.step)
            log.info("resumed from %s at step %d", directory, self.step)

    def write_final(self) -> Path:
        """The model after the last step, in ``out_dir/final`` (rank 0)."""
        final = self.out_dir / "final"
        if self.rank == 0:
            for m in self.modules:
                m.eval()
            with atomic_directory(final) as tmp:
                self.save_model(tmp)
            for m in self.modules:
                m.train()
        self.barrier()
        return final

    # ---------------------------------------------------------------- the loop
    def _stop_for_time(self, started: float) -> bool:
        """True once ``time_limit_s`` has passed (every process agrees, rank 0 decides)."""
        limit = self.settings.time_limit_s
        if not limit:
            return False
        flag = torch.tensor([float(time.perf_counter() - started > limit)])
        if self.world > 1:
            if dist.get_backend() == "nccl":
                flag = flag.to(self.device)
            dist.broadcast(flag, 0)
        return bool(flag.item())

    def _created_files(self) -> list[Path]:
        """What run() is about to create (for removal if the run fails before its first step)."""
        if self.rank != 0 or self.step != 0:
            return []
        missing = [p for p in (self.out_dir / "train_config.json", self.out_dir / "log.jsonl") if not p.exists()]
        return missing + ([self.out_dir] if not self.out_dir.exists() else [])

    def run(self, train_step: Callable[[nn.Module], Step], *, config: dict,
            rates: Callable[[dict[str, float], float], dict[str, float]],
            show: Sequence[str] = ("loss",)) -> Path:
        """Run until ``steps`` (or the time limit); returns ``out_dir/final``.

        ``train_step(forward_module)`` draws the next batch and back-propagates its loss (the loop has
        zeroed the gradients); ``rates(counts, seconds)`` turns a window's summed counts into the
        logged rates; ``show`` names the record keys on the progress bar; ``config`` is written to
        ``train_config.json``.
        """
        from tqdm.auto import tqdm

        s = self.settings
        created = self._created_files()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.out_dir / "train_config.json") as f:
                f.write(json.dumps(config, indent=2, ensure_ascii=False))
        visible = not self.quiet and self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=s.steps, initial=self.step, disable=not visible, desc=self.stage, unit="step",
                   dynamic_ncols=True)
        log_file = open(self.out_dir / "log.jsonl", "a", encoding="utf-8") if self.rank == 0 else None
        window = _Window()
        started = time.perf_counter()
        try:
            while self.step < s.steps:
                if self._stop_for_time(started):
                    log.warning("time limit of %.0f s reached at step %d of %d: stopping", s.time_limit_s,
                                self.step, s.steps)
                    if self.step % s.save_every:
                        self.save()
                    break
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.zero_grad(set_to_none=True)
                result = train_step(self.forward)
                parts = dict(result.parts)
                if s.clip_norm > 0:
                    parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(self.parameters()), s.clip_norm))
                if not math.isfinite(parts["loss"]):
                    raise InputError(f"step {self.step + 1}: the loss is {parts['loss']}; lower lr or check the data")
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                window.add(parts, result.counts)
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == s.steps:
                    record = {"step": self.step, "lr": lr, **window.record(rates)}
                    if log_file is not None:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    bar.set_postfix({k: f"{record[k]:.3f}" for k in show if k in record})
                    if self.on_step is not None:
                        self.on_step(self.step, record)
                if self.step % s.save_every == 0 or self.step == s.steps:
                    self.save()
        except InputError:
            if created:  # unusable data or config before any step: leave no run behind
                if log_file is not None:
                    log_file.close()
                    log_file = None
                _remove_created(created)
            raise
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        return self.write_final()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _Window:
    """Loss parts and counts since the last logged step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.parts: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, parts: dict[str, float], counts: dict[str, float]) -> None:
        self.steps += 1
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def record(self, rates: Callable[[dict[str, float], float], dict[str, float]]) -> dict[str, float]:
        """The window's averages and rates; starts the next window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {**{k: v / self.steps for k, v in self.parts.items()}, **rates(self.counts, elapsed)}
        self.reset()
        return out


def _remove_created(paths: list[Path]) -> None:
    for p in paths:
        try:
            if p.is_dir():
                p.rmdir()  # only when empty
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass
