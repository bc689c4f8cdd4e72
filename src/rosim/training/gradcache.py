"""Gradient cache: exact large-batch in-batch contrastive gradients, computed in small chunks.

A contrastive loss couples every row of the batch, so summing per-chunk losses (plain gradient
accumulation) is *not* the large-batch loss. The gradient cache (Gao et al. 2021; Su, post 8471)
gets the exact large-batch gradient with the memory of one chunk:

1. forward every chunk **without** gradients, recording the random state (CPU and CUDA) before each
   chunk, and keep only the embeddings;
2. compute the loss on the whole batch's embeddings and its gradient ``G = dL/dE`` (the "cache");
3. for each chunk, restore its random state (same dropout masks), forward again **with** gradients
   and back-propagate ``G[chunk]``: ``E[chunk].backward(G[chunk])``.

Since ``dL/dθ = Σ_chunks (dE_chunk/dθ)ᵀ G_chunk``, the parameter gradients are those of the full
batch, dropout included, at the cost of one extra forward pass. This module is model-agnostic: an
"encoder" is any callable returning one embedding row per input row.

Inputs: a batch is a tensor (``model(x)``), a tuple/list (``model(*x)``), a dict (``model(**x)``) or
:class:`Args` (``model(*args, **kwargs)``); tensors anywhere inside (nested too) are split along
dim 0 and must all have the same number of rows; other values are passed unchanged to every chunk.

Distributed (``torch.distributed``): each rank encodes its local batch, the embeddings are
all-gathered so that the loss is the *global* batch's loss, and each rank back-propagates the slice
of ``dL/dE`` that belongs to its rows. DDP averages gradients over ranks, so that slice is multiplied
by the world size (``ddp_average=True``): the averaged gradient is then exactly ``dL_global/dθ``.
DDP-wrapped encoders run all chunks but the last (per module) under ``no_sync()``.

Mixed precision: pass ``autocast_dtype`` to run the forwards under ``torch.autocast``; the loss is
computed in float32 on upcast embeddings. With a ``GradScaler`` the loss is scaled before its
gradient is cached, so the parameters receive *scaled* gradients: call ``scaler.step(optimizer)``
and ``scaler.update()`` afterwards as usual.

Caveat: BatchNorm batch statistics cannot be made equal to the full batch's (and running statistics
are updated by both passes); the encoders here should use LayerNorm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rosim.errors import InputError

__all__ = [
    "Args",
    "GradCache",
    "RandomState",
    "all_gather_with_grad",
    "batch_rows",
    "contrastive_backward",
    "gradcache_backward",
    "split_batch",
]

Encoder = Callable[..., Any]
RepFn = Callable[[Any], Any]


class Args:
    """Explicit call arguments for an encoder: ``Args(ids, mask, token_type_ids=t)`` → ``model(ids, mask, token_type_ids=t)``."""

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Args(*{self.args!r}, **{self.kwargs!r})"


# ----------------------------------------------------------------------------------------- batches


def _rows(obj: Any, path: str, found: list[tuple[str, int]]) -> None:
    """Collect (path, rows) of every tensor with a batch dimension inside ``obj``."""
    if isinstance(obj, Tensor):
        if obj.dim() > 0:
            found.append((path, obj.shape[0]))
    elif isinstance(obj, Args):
        for i, a in enumerate(obj.args):
            _rows(a, f"{path}.args[{i}]", found)
        for k, v in obj.kwargs.items():
            _rows(v, f"{path}.kwargs[{k!r}]", found)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _rows(v, f"{path}[{k!r}]", found)
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            _rows(v, f"{path}[{i}]", found)


def batch_rows(batch: Any, name: str = "batch") -> int:
    """Number of rows of ``batch``; every tensor inside must have that many rows (dim 0)."""
    found: list[tuple[str, int]] = []
    _rows(batch, name, found)
    if not found:
        raise InputError(f"{name} contains no tensor with a batch dimension; pass tensors of shape (N, ...)")
    n = found[0][1]
    bad = [(p, r) for p, r in found if r != n]
    if bad:
        listing = ", ".join(f"{p} has {r}" for p, r in found)
        raise InputError(f"mismatched batch sizes in {name}: {listing} rows; all inputs must have the same rows")
    if n == 0:
        raise InputError(f"{name} is empty (0 rows)")
    return n


def _slice(obj: Any, start: int, stop: int) -> Any:
    if isinstance(obj, Tensor):
        return obj[start:stop] if obj.dim() > 0 else obj
    if isinstance(obj, Args):
        return Args(*(_slice(a, start, stop) for a in obj.args),
                    **{k: _slice(v, start, stop) for k, v in obj.kwargs.items()})
    if isinstance(obj, Mapping):
        return {k: _slice(v, start, stop) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_slice(v, start, stop) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(v, start, stop) for v in obj)
    return obj


def split_batch(batch: Any, chunk_size: int, name: str = "batch") -> list[Any]:
    """Split every tensor inside ``batch`` into chunks of ``chunk_size`` rows (the last may be smaller)."""
    n = batch_rows(batch, name)
    _check_chunk_size(chunk_size, n, name)
    return [_slice(batch, s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _check_chunk_size(chunk_size: Any, n: int, name: str) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise InputError(f"chunk_size must be an int, got {chunk_size!r}")
    if chunk_size <= 0 or chunk_size > n:
        raise InputError(
            f"chunk_size must be between 1 and the batch size of {name} ({n} rows), got {chunk_size}"
        )


def _call(model: Encoder, chunk: Any) -> Any:
    if isinstance(chunk, Args):
        return model(*chunk.args, **chunk.kwargs)
    if isinstance(chunk, Mapping):
        return model(**chunk)
    if isinstance(chunk, (tuple, list)) and not hasattr(chunk, "_fields"):
        return model(*chunk)
    return model(chunk)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Args):
        yield from _tensors(obj.args)
        yield from _tensors(obj.kwargs)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)


# ------------------------------------------------------------------------------------ random state


@dataclass
class RandomState:
    """The CPU random state and the states of some CUDA devices, to replay dropout exactly."""

    cpu: Tensor
    cuda: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, cuda_devices: Sequence[int] = ()) -> RandomState:
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices})

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the caller's random state is restored afterwards."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for d, s in self.cuda.items():
                torch.cuda.set_rng_state(s, d)
            yield


def _cuda_devices(model: Encoder, chunk: Any) -> list[int]:
    if not torch.cuda.is_available():
        return []
    devs = {t.device.index for t in _tensors(chunk) if t.is_cuda}
    if hasattr(model, "parameters"):
        devs |= {p.device.index for p in model.parameters() if p.is_cuda}
    return sorted(d if d is not None else torch.cuda.current_device() for d in devs)


# ------------------------------------------------------------------------------------- distributed


def _world(distributed: bool | None) -> tuple[int, int]:
    """(world_size, rank) of the process group to gather over, (1, 0) when not distributed."""
    active = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = active and dist.get_world_size() > 1
    if not distributed:
        return 1, 0
    if not active:
        raise InputError("distributed=True but torch.distributed is not initialised; call init_process_group first")
    return dist.get_world_size(), dist.get_rank()


def _collective_device(like: Tensor | None = None) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if like is not None else torch.device("cpu")


def _check_same_rows(rows: list[int], world: int) -> None:
    local = torch.tensor(rows, dtype=torch.long, device=_collective_device())
    every = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(every, local)
    table = torch.stack(every).cpu()
    if not bool((table == table[0]).all()):
        raise InputError(
            f"every rank must pass batches of the same sizes to the gradient cache; rows per rank: {table.tolist()}"
        )


def _all_gather(t: Tensor, world: int) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous())
    return parts


def all_gather_with_grad(t: Tensor, distributed: bool | None = None) -> Tensor:
    """All-gather ``t`` along dim 0 across ranks; the local slice keeps its autograd graph.

    (Collectives are not differentiable: the other ranks' slices are constants here, and each rank
    back-propagates into its own rows.) Returns ``t`` unchanged when not distributed.
    """
    world, rank = _world(distributed)
    if world == 1:
        return t
    parts = _all_gather(t, world)
    parts[rank] = t
    return torch.cat(parts)


# -------------------------------------------------------------------------------------- the cache


def _representation(out: Any, rep_fn: RepFn | None, rows: int, where: str) -> tuple[Tensor, Tensor | None]:
    """Normalise an encoder output to (embedding rows, optional additive auxiliary loss)."""
    if rep_fn is not None:
        out = rep_fn(out)
    aux = None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and isinstance(out[1], Tensor):
        out, aux = out
        if aux.dim() != 0:
            raise InputError(f"{where}: the auxiliary loss must be a scalar tensor, got shape {tuple(aux.shape)}")
    if not isinstance(out, Tensor):
        raise InputError(
            f"{where}: the encoder returned {type(out).__name__}; it must return a tensor of embeddings "
            f"(or (embeddings, aux_loss)); pass rep_fn=... to pick the embeddings from its output"
        )
    if out.dim() == 0 or out.shape[0] != rows:
        raise InputError(
            f"{where}: the encoder returned shape {tuple(out.shape)} for a chunk of {rows} rows; "
            f"it must return one embedding row per input row"
        )
    return out, aux


def _as_list(x: Any, k: int, what: str) -> list[Any]:
    if isinstance(x, (list, tuple, nn.ModuleList)):
        if len(x) != k:
            raise InputError(f"got {len(x)} {what} for {k} batches; pass one per batch (or a single one)")
        return list(x)
    return [x] * k


def _no_sync(model: Encoder) -> contextlib.AbstractContextManager:
    fn = getattr(model, "no_sync", None)
    return fn() if callable(fn) else contextlib.nullcontext()


def _autocast(dtype: torch.dtype | None, model: Encoder, chunk: Any) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    device = next(iter(_tensors(chunk)), None)
    if hasattr(model, "parameters"):
        device = next(iter(model.parameters()), device)
    device_type = device.device.type if device is not None else "cpu"
    return torch.autocast(device_type=device_type, dtype=dtype)


def gradcache_backward(
    models: Encoder | Sequence[Encoder],
    batches: Sequence[Any],
    loss_fn: Callable[..., Tensor],
    chunk_size: int | Sequence[int],
    *,
    loss_kwargs: Mapping[str, Any] | None = None,
    rep_fn: RepFn | None = None,
    scaler: Any | None = None,
    autocast_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
    ddp_average: bool = True,
    _replay_rng: bool = True,
) -> Tensor:
    """Accumulate into ``.grad`` the exact gradient of ``loss_fn(*embeddings)`` over whole batches.

    ``models[i]`` encodes ``batches[i]`` (one model for all batches if a single one is given; pass
    the same module twice for tied towers) in chunks of ``chunk_size[i]`` rows; ``loss_fn`` receives
    the embeddings of the full batches (all ranks' rows when distributed), in order, plus
    ``loss_kwargs``, and must return a scalar. An encoder may return ``(embeddings, aux_loss)``: the
    scalar ``aux_loss`` of each chunk (e.g. a token cross-entropy already divided by the whole
    batch's token count) is back-propagated with that chunk and added to the returned loss.

    Returns the true loss (detached, unscaled). Does not zero gradients nor step the optimiser.
    """
    batches = list(batches)
    if not batches:
        raise InputError("gradcache_backward needs at least one batch")
    k = len(batches)
    encoders = _as_list(models, k, "models")
    sizes = _as_list(chunk_size, k, "chunk sizes")
    names = [f"batches[{i}]" if k > 1 else "batch" for i in range(k)]
    rows = [batch_rows(b, n) for b, n in zip(batches, names, strict=True)]
    for c, n, name in zip(sizes, rows, names, strict=True):
        _check_chunk_size(c, n, name)
    world, rank = _world(distributed)
    if world > 1:
        _check_same_rows(rows, world)
    chunks = [[_slice(b, s, min(s + c, n)) for s in range(0, n, c)]
              for b, c, n in zip(batches, sizes, rows, strict=True)]

    # 1. no-grad forward of every chunk, recording the random state before each one
    reps: list[Tensor] = []
    states: list[list[RandomState]] = []
    aux_total = torch.zeros(())
    with torch.no_grad():
        for i, (model, parts) in enumerate(zip(encoders, chunks, strict=True)):
            got, st = [], []
            for j, chunk in enumerate(parts):
                st.append(RandomState.capture(_cuda_devices(model, chunk)))
                with _autocast(autocast_dtype, model, chunk):
                    out = _call(model, chunk)
                rep, aux = _representation(out, rep_fn, batch_rows(chunk), f"{names[i]} chunk {j}")
                got.append(rep.detach().clone())  # clone: a view would keep the whole output alive
                if aux is not None:
                    aux_total = aux_total.to(aux.device) + aux.detach().float()
                del out, rep, aux
            reps.append(torch.cat(got))
            states.append(st)

    # 2. the loss over the whole (global) batch and its gradient with respect to the embeddings
    leaves = []
    for r in reps:
        x = r.float() if r.dtype in (torch.float16, torch.bfloat16) else r
        if world > 1:
            x = torch.cat(_all_gather(x, world))
        leaves.append(x.requires_grad_())
    loss = loss_fn(*leaves, **(loss_kwargs or {}))
    if not isinstance(loss, Tensor):
        raise InputError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise InputError(
            f"loss_fn must return a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; reduce it, e.g. with .mean()"
        )
    if not loss.requires_grad:
        raise InputError("loss_fn's result does not depend on the embeddings it was given; nothing to back-propagate")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    cache = []
    for leaf, r, n in zip(leaves, reps, rows, strict=True):
        g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        if world > 1:
            g = g[rank * n:(rank + 1) * n]
            if ddp_average:
                g = g * world
        cache.append(g.to(r.dtype))
    del leaves, reps

    # 3. per chunk: replay the random state, forward with gradients, back-propagate the cached slice
    last_use = {id(m): (i, len(chunks[i]) - 1) for i, m in enumerate(encoders)}
    for i, (model, parts) in enumerate(zip(encoders, chunks, strict=True)):
        start = 0
        for j, chunk in enumerate(parts):
            n = batch_rows(chunk)
            sync = last_use[id(model)] == (i, j)
            with contextlib.nullcontext() if sync else _no_sync(model):
                with states[i][j].replay() if _replay_rng else contextlib.nullcontext():
                    with _autocast(autocast_dtype, model, chunk):
                        out = _call(model, chunk)
                rep, aux = _representation(out, rep_fn, n, f"{names[i]} chunk {j}")
                tensors, grads = [rep], [cache[i][start:start + n]]
                if aux is not None:
                    tensors.append(scaler.scale(aux) if scaler is not None else aux)
                    grads.append(None)
                torch.autograd.backward(tensors, grads)
                del out, rep, aux, tensors, grads
            start += n
    return loss.detach() + aux_total.to(loss.device)


class GradCache:
    """Gradient-cached contrastive step over one or several encoders.

    >>> gc = GradCache([query_encoder, doc_encoder], chunk_size=32, loss_fn=query_document_contrastive_loss)
    >>> loss = gc.step(query_batch, doc_batch)       # gradients are now in .grad
    >>> optimizer.step(); optimizer.zero_grad()

    See :func:`gradcache_backward` for the meaning of the arguments.
    """

    def __init__(
        self,
        models: Encoder | Sequence[Encoder],
        chunk_size: int | Sequence[int],
        loss_fn: Callable[..., Tensor],
        *,
        rep_fn: RepFn | None = None,
        scaler: Any | None = None,
        autocast_dtype: torch.dtype | None = None,
        distributed: bool | None = None,
        ddp_average: bool = True,
    ) -> None:
        sizes = chunk_size if isinstance(chunk_size, (list, tuple)) else [chunk_size]
        for c in sizes:
            if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
                raise InputError(f"chunk_size must be a positive int, got {c!r}")
        self.models = models
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn
        self.rep_fn = rep_fn
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.distributed = distributed
        self.ddp_average = ddp_average

    def step(self, *batches: Any, **loss_kwargs: Any) -> Tensor:
        """Accumulate the exact gradient of the whole-batch loss; returns the loss (detached)."""
        return gradcache_backward(
            self.models, batches, self.loss_fn, self.chunk_size, loss_kwargs=loss_kwargs,
            rep_fn=self.rep_fn, scaler=self.scaler, autocast_dtype=self.autocast_dtype,
            distributed=self.distributed, ddp_average=self.ddp_average,
        )

    __call__ = step


# ---------------------------------------------------------------------------------- trainer hook


class _Encode:
    """Wraps ``encode_fn`` so that its single batch argument is not unpacked, and exposes ``no_sync``."""

    def __init__(self, encode_fn: Callable[[Any], Any], module: nn.Module | None) -> None:
        self.encode_fn = encode_fn
        if module is not None and hasattr(module, "no_sync"):
            self.no_sync = module.no_sync
        self.module = module

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.module.parameters()) if self.module is not None else iter(())

    def __call__(self, batch: Any) -> Any:
        return self.encode_fn(batch)


def contrastive_backward(
    encode_fn: Callable[[Any], Any],
    batch: Any,
    loss_fn: Callable[..., Tensor],
    chunk_size: int | None = None,
    *,
    module: nn.Module | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    scaler: Any | None = None,
    autocast_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
    ddp_average: bool = True,
) -> Tensor:
    """One backward of ``loss_fn(encode_fn(batch))`` for the training pipelines.

    ``chunk_size=None``: the plain full-batch forward and backward. An int: the gradient cache with
    chunks of that many rows (same gradients, memory of one chunk). ``encode_fn(batch)`` returns the
    embeddings, or ``(embeddings, aux_loss)`` where ``aux_loss`` is additive over chunks (e.g. the
    generation loss of stage 1, normalised by the whole batch). ``module`` is the (DDP-wrapped)
    model, used for ``no_sync``. Returns the total loss, detached.
    """
    if chunk_size is not None:
        return gradcache_backward(
            _Encode(encode_fn, module), [Args(batch)], loss_fn, chunk_size, loss_kwargs=loss_kwargs,
            scaler=scaler, autocast_dtype=autocast_dtype, distributed=distributed, ddp_average=ddp_average,
        )
    rows = batch_rows(batch)
    world, _ = _world(distributed)
    with _autocast(autocast_dtype, _Encode(encode_fn, module), batch):
        out = encode_fn(batch)
    rep, aux = _representation(out, None, rows, "batch")
    emb = rep.float() if rep.dtype in (torch.float16, torch.bfloat16) else rep
    if world > 1:
        emb = all_gather_with_grad(emb, True)
    loss = loss_fn(emb, **(loss_kwargs or {}))
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise InputError(f"loss_fn must return a scalar (0-dim) tensor, got {shape}")
    total = loss * world if (world > 1 and ddp_average) else loss
    if aux is not None:
        total = total + aux
    (scaler.scale(total) if scaler is not None else total).backward()
    return (loss + aux).detach() if aux is not None else loss.detach()
