"""Gradient cache: exact large-batch in-batch contrastive gradients, computed in small chunks.

A contrastive loss couples every row of the batch, so summing per-chunk losses (plain gradient
accumulation) is *not* the large-batch loss. The gradient cache (Gao et al. 2021; Su, post 8471)
gets the exact large-batch gradient with the memory of one chunk, in three phases:

1. :func:`_encode_without_grad`: forward every chunk **without** gradients, recording the random
   state (CPU and CUDA) before each chunk, and keep only the embeddings ``E``;
2. :func:`_embedding_gradients`: the loss ``L`` on the whole batch's embeddings and its gradient
   ``G = ∂L/∂E`` (the "cache");
3. :func:`_backward_chunks`: for each chunk, restore its random state (same dropout masks), forward
   again **with** gradients and back-propagate ``G[chunk]``: ``E[chunk].backward(G[chunk])``.

Since ``∂L/∂θ = Σ_chunks (∂E_chunk/∂θ)ᵀ G_chunk``, the parameter gradients are those of the full
batch, dropout included, at the cost of one extra forward pass. This module is model-agnostic: an
"encoder" is any callable returning one embedding row per input row.

Inputs: a batch is a tensor (``model(x)``), a tuple/list (``model(*x)``), a dict (``model(**x)``) or
:class:`Args` (``model(*args, **kwargs)``). It is walked as a :mod:`torch.utils._pytree` tree (dict,
list, tuple, namedtuple, :class:`Args`; register other containers with pytree): tensors anywhere
inside are split along dim 0 and must all have the same number of rows; other leaves (and 0-dim
tensors) are passed unchanged to every chunk.

Distributed (``torch.distributed``): each rank encodes its local batch, the embeddings are
all-gathered so that the loss is the *global* batch's loss, and each rank back-propagates the slice
of ``∂L/∂E`` that belongs to its rows. The ranks' parameter gradients therefore **sum** to
``∂L_global/∂θ``: reduce them with a sum, as :func:`rosim.training.loop.data_parallel` does (DDP
with a summing communication hook; DDP's default hook averages, which divides by the world size).
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
from torch.utils._pytree import (
    GetAttrKey,
    keystr,
    register_pytree_node,
    tree_flatten_with_path,
    tree_leaves,
    tree_map_only,
)

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


# A pytree node with two children, the positional tuple and the keyword dict (paths ".args[0]", ".kwargs['k']").
register_pytree_node(
    Args,
    lambda a: ([a.args, a.kwargs], None),
    lambda children, _: Args(*children[0], **children[1]),
    serialized_type_name=f"{__name__}.Args",
    flatten_with_keys_fn=lambda a: ([(GetAttrKey("args"), a.args), (GetAttrKey("kwargs"), a.kwargs)], None),
)


# ----------------------------------------------------------------------------------------- batches


def _tensors(batch: Any) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(batch) if isinstance(leaf, Tensor)]


def batch_rows(batch: Any, name: str = "batch") -> int:
    """Number of rows of ``batch``; every tensor inside must have that many rows (dim 0)."""
    rows_at = [(name + keystr(path), leaf.shape[0]) for path, leaf in tree_flatten_with_path(batch)[0]
               if isinstance(leaf, Tensor) and leaf.dim() > 0]
    if not rows_at:
        raise InputError(f"{name} contains no tensor with a batch dimension; pass tensors of shape (N, ...)")
    n = rows_at[0][1]
    if any(rows != n for _, rows in rows_at):
        listing = ", ".join(f"{path} has {rows}" for path, rows in rows_at)
        raise InputError(f"mismatched batch sizes in {name}: {listing} rows; all inputs must have the same rows")
    if n == 0:
        raise InputError(f"{name} is empty (0 rows)")
    return n


def _row_slice(batch: Any, start: int, stop: int) -> Any:
    """``batch`` with every tensor cut to rows ``start:stop`` (0-dim tensors and other leaves kept)."""
    return tree_map_only(Tensor, lambda t: t[start:stop] if t.dim() > 0 else t, batch)


def split_batch(batch: Any, chunk_size: int, name: str = "batch") -> list[Any]:
    """Split every tensor inside ``batch`` into chunks of ``chunk_size`` rows (the last may be smaller)."""
    n = batch_rows(batch, name)
    _check_chunk_size(chunk_size, n, name)
    return [_row_slice(batch, s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


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
    """Every rank's ``t`` (detached), in rank order."""
    gathered = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(gathered, t.detach().contiguous())
    return gathered


def all_gather_with_grad(t: Tensor, distributed: bool | None = None) -> Tensor:
    """All-gather ``t`` along dim 0 across ranks; the local slice keeps its autograd graph.

    (Collectives are not differentiable: the other ranks' slices are constants here, and each rank
    back-propagates into its own rows.) Returns ``t`` unchanged when not distributed.
    """
    world, rank = _world(distributed)
    if world == 1:
        return t
    gathered = _all_gather(t, world)
    gathered[rank] = t
    return torch.cat(gathered)


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


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor):
        raise InputError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise InputError(
            f"loss_fn must return a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; reduce it, e.g. with .mean()"
        )


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


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass
class _ChunkedBatch:
    """One batch of a step: the encoder that encodes it, its name in messages, its chunks and their rows."""

    encoder: Encoder
    name: str
    chunks: list[Any]
    chunk_rows: list[int]

    @property
    def rows(self) -> int:
        return sum(self.chunk_rows)

    def where(self, j: int) -> str:
        return f"{self.name} chunk {j}"


def _chunked_batches(models: Encoder | Sequence[Encoder], batches: Sequence[Any],
                     chunk_size: int | Sequence[int]) -> list[_ChunkedBatch]:
    """Pair every batch with its encoder and split it into chunks, checking sizes."""
    batches = list(batches)
    if not batches:
        raise InputError("gradcache_backward needs at least one batch")
    k = len(batches)
    encoders = _as_list(models, k, "models")
    sizes = _as_list(chunk_size, k, "chunk sizes")
    chunked = []
    for i, (encoder, batch, size) in enumerate(zip(encoders, batches, sizes, strict=True)):
        name = f"batches[{i}]" if k > 1 else "batch"
        chunks = split_batch(batch, size, name)
        chunked.append(_ChunkedBatch(encoder, name, chunks, [batch_rows(c) for c in chunks]))
    return chunked


def _encode_without_grad(
    batches: list[_ChunkedBatch], rep_fn: RepFn | None, autocast_dtype: torch.dtype | None,
) -> tuple[list[Tensor], list[list[RandomState]], Tensor]:
    """Phase 1: ``E_c = f_θ(x_c)`` for every chunk ``c``, without building a graph.

    Returns, per batch, its embeddings ``E = [E_1; …; E_C]`` (the chunks' rows concatenated, detached),
    the random state taken just before each chunk's forward (phase 3 replays it, so that dropout draws
    the same masks), and ``Σ_c aux_c``, the sum of the chunks' auxiliary losses (detached, float32).
    """
    embeddings: list[Tensor] = []
    states: list[list[RandomState]] = []
    aux_total = torch.zeros(())
    with torch.no_grad():
        for b in batches:
            chunk_embeddings, chunk_states = [], []
            for j, (chunk, rows) in enumerate(zip(b.chunks, b.chunk_rows, strict=True)):
                chunk_states.append(RandomState.capture(_cuda_devices(b.encoder, chunk)))
                with _autocast(autocast_dtype, b.encoder, chunk):
                    out = _call(b.encoder, chunk)
                rep, aux = _representation(out, rep_fn, rows, b.where(j))
                chunk_embeddings.append(rep.detach().clone())  # clone: a view would keep the whole output alive
                if aux is not None:
                    aux_total = aux_total.to(aux.device) + aux.detach().float()
                del out, rep, aux
            embeddings.append(torch.cat(chunk_embeddings))
            states.append(chunk_states)
    return embeddings, states, aux_total


def _embedding_gradients(
    embeddings: list[Tensor], loss_fn: Callable[..., Tensor], loss_kwargs: Mapping[str, Any] | None,
    scaler: Any | None, world: int, rank: int,
) -> tuple[Tensor, list[Tensor]]:
    """Phase 2: the loss over the whole (global) batch and the cache ``G_i = ∂(s·L)/∂E_i``.

    ``L = loss_fn(E_1, …, E_k, **loss_kwargs)`` on float32 copies of the embeddings (half precision is
    upcast), each ``E_i`` holding every rank's rows in rank order when distributed; ``s`` is the
    scaler's scale (1 without a scaler). ``G_i`` keeps only this rank's rows of ``∂(s·L)/∂E_i``, in
    ``E_i``'s dtype (zeros where ``L`` does not depend on ``E_i``). Returns ``(L, [G_1, …, G_k])``,
    ``L`` detached and unscaled.
    """
    global_embeddings = []
    for e in embeddings:
        x = _upcast(e)
        if world > 1:
            x = torch.cat(_all_gather(x, world))
        global_embeddings.append(x.requires_grad_())
    loss = loss_fn(*global_embeddings, **(loss_kwargs or {}))
    _check_loss(loss)
    if not loss.requires_grad:
        raise InputError("loss_fn's result does not depend on the embeddings it was given; nothing to back-propagate")
    (scaler.scale(loss) if scaler is not None else loss).backward()
    cache = []
    for x, e in zip(global_embeddings, embeddings, strict=True):
        grad = x.grad if x.grad is not None else torch.zeros_like(x)
        if world > 1:
            n = e.shape[0]
            grad = grad[rank * n:(rank + 1) * n]
        cache.append(grad.to(e.dtype))
    return loss.detach(), cache


def _backward_chunks(
    batches: list[_ChunkedBatch], states: list[list[RandomState]], cache: list[Tensor],
    rep_fn: RepFn | None, scaler: Any | None, autocast_dtype: torch.dtype | None,
) -> None:
    """Phase 3: accumulate ``∂(s·L)/∂θ = Σ_c (∂E_c/∂θ)ᵀ G_c`` into ``.grad``, one chunk at a time.

    For each chunk ``c``: replay its random state (phase 1's dropout masks), forward again with
    gradients and back-propagate ``E_c`` with ``G_c``, its rows of the cache (a vector-Jacobian
    product), together with its auxiliary loss ``s·aux_c`` (whose gradient is its own). An encoder
    with ``no_sync`` (DDP) skips the gradient reduction on all but its last chunk of the step.
    """
    last_use = {id(b.encoder): (i, len(b.chunks) - 1) for i, b in enumerate(batches)}
    for i, (b, batch_states, batch_cache) in enumerate(zip(batches, states, cache, strict=True)):
        chunk_grads = batch_cache.split(b.chunk_rows)
        for j, (chunk, rows, state, grad) in enumerate(zip(b.chunks, b.chunk_rows, batch_states, chunk_grads,
                                                           strict=True)):
            sync = last_use[id(b.encoder)] == (i, j)
            with contextlib.nullcontext() if sync else _no_sync(b.encoder):
                with state.replay(), _autocast(autocast_dtype, b.encoder, chunk):
                    out = _call(b.encoder, chunk)
                rep, aux = _representation(out, rep_fn, rows, b.where(j))
                outputs, output_grads = [rep], [grad]
                if aux is not None:
                    outputs.append(scaler.scale(aux) if scaler is not None else aux)
                    output_grads.append(None)
                torch.autograd.backward(outputs, output_grads)
                del out, rep, aux, outputs, output_grads


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
) -> Tensor:
    """Accumulate into ``.grad`` the exact gradient of ``loss_fn(*embeddings)`` over whole batches.

    ``models[i]`` encodes ``batches[i]`` (one model for all batches if a single one is given; pass
    the same module twice for tied towers) in chunks of ``chunk_size[i]`` rows; ``loss_fn`` receives
    the embeddings of the full batches (all ranks' rows when distributed), in order, plus
    ``loss_kwargs``, and must return a scalar. An encoder may return ``(embeddings, aux_loss)``: the
    scalar ``aux_loss`` of each chunk (e.g. a token cross-entropy already divided by the whole
    batch's token count) is back-propagated with that chunk and added to the returned loss.
    ``distributed=None`` gathers over the default process group when one with several ranks is
    initialised; each rank then gets its share of the gradient (the shares sum to the gradient).

    Returns the true loss (detached, unscaled). Does not zero gradients nor step the optimiser.
    """
    chunked = _chunked_batches(models, batches, chunk_size)
    world, rank = _world(distributed)
    if world > 1:
        _check_same_rows([b.rows for b in chunked], world)
    embeddings, states, aux_total = _encode_without_grad(chunked, rep_fn, autocast_dtype)
    loss, cache = _embedding_gradients(embeddings, loss_fn, loss_kwargs, scaler, world, rank)
    del embeddings  # only the cache is needed from here on
    _backward_chunks(chunked, states, cache, rep_fn, scaler, autocast_dtype)
    return loss + aux_total.to(loss.device)


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

    def step(self, *batches: Any, **loss_kwargs: Any) -> Tensor:
        """Accumulate the exact gradient of the whole-batch loss; returns the loss (detached)."""
        return gradcache_backward(
            self.models, batches, self.loss_fn, self.chunk_size, loss_kwargs=loss_kwargs,
            rep_fn=self.rep_fn, scaler=self.scaler, autocast_dtype=self.autocast_dtype,
            distributed=self.distributed,
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
) -> Tensor:
    """One backward of ``loss_fn(encode_fn(batch))`` for the training pipelines.

    ``chunk_size=None``: the plain full-batch forward and backward. An int: the gradient cache with
    chunks of that many rows (same gradients, memory of one chunk). ``encode_fn(batch)`` returns the
    embeddings, or ``(embeddings, aux_loss)`` where ``aux_loss`` is additive over chunks (e.g. the
    generation loss of stage 1, normalised by the whole batch). ``module`` is the (DDP-wrapped)
    model, used for ``no_sync``. Distributed, both ways give each rank its share of the global
    batch's gradient (the shares sum to it). Returns the total loss, detached.
    """
    if chunk_size is not None:
        return gradcache_backward(
            _Encode(encode_fn, module), [Args(batch)], loss_fn, chunk_size, loss_kwargs=loss_kwargs,
            scaler=scaler, autocast_dtype=autocast_dtype, distributed=distributed,
        )
    rows = batch_rows(batch)
    world, _ = _world(distributed)
    with _autocast(autocast_dtype, _Encode(encode_fn, module), batch):
        out = encode_fn(batch)
    rep, aux = _representation(out, None, rows, "batch")
    emb = _upcast(rep)
    if world > 1:
        emb = all_gather_with_grad(emb, True)
    loss = loss_fn(emb, **(loss_kwargs or {}))
    _check_loss(loss)
    total = loss + aux if aux is not None else loss
    (scaler.scale(total) if scaler is not None else total).backward()
    return total.detach()
