"""The three training objectives: what one step computes and back-propagates.

* ``mlm``    — optional warm-up for a model trained from scratch: whole-word-masked LM on single
  sentences (bidirectional attention).
* ``stage1`` — L_gen + L_sim: one UniLM forward per row gives both the target-token logits and the
  pooled [CLS] vector (the UniLM mask keeps [CLS] blind to the target, so it equals the vector of
  the source alone); L_sim is the in-batch contrastive loss over the *global* batch (scale 20).
* ``stage2`` — L_gen + λ·mean((S_student − S_teacher)²): cosine-matrix distillation of teacher vectors
  of the rows' (clean) source sentences, λ = 100; no contrastive term.

Every objective works on a per-process shard of the global batch and arranges its losses so that
the gradients *summed over processes* are those of the global batch (DDP sums them, see
:func:`rosim.training.loop.data_parallel`): token losses are sums divided by the global token count; batch-coupled losses go
through the gradient-cache module, which all-gathers the vectors and back-propagates each
process's own rows. With ``chunk_size`` the coupled part is gradient-cached (same gradients,
memory of one chunk).

``rdrop_alpha > 0`` (``[loss] rdrop_alpha``, stages 1 and 2) runs every row twice (independent dropout
masks) and replaces L_gen by token-level R-Drop, ½(CE1 + CE2) + (α/2)·SKL per target token
(:mod:`rosim.training.rdrop`); the pooled vectors come from the first pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rosim.modeling.model import RoFormerSim
from rosim.training.data import Batch
from rosim.training.gradcache import contrastive_backward
from rosim.training.losses import distillation_loss, generation_target_mask, roformer_sim_contrastive_loss
from rosim.training.rdrop import generation_rdrop_sum
from rosim.training.teachers import Teacher, check_teacher_output


@dataclass
class StepContext:
    """What an objective needs to know about the run."""

    world: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None
    chunk_size: int = 0


def _all_reduce_sum(value: float | int, ctx: StepContext) -> float:
    if ctx.world == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(ctx.device)
    dist.all_reduce(t)
    return float(t.item())


def _autocast(ctx: StepContext):
    if ctx.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)


def gen_loss_sum(model: RoFormerSim, hidden: torch.Tensor, input_ids, token_type_ids, attention_mask) -> torch.Tensor:
    """Summed target-token cross-entropy; logits only at target positions (saves the (B, L, V) tensor)."""
    mask = generation_target_mask(token_type_ids, attention_mask)
    logits = model.lm_logits(hidden[:, :-1][mask]).float()
    return F.cross_entropy(logits, input_ids[:, 1:][mask], reduction="sum")


def unwrap(model: torch.nn.Module) -> RoFormerSim:
    """The model inside a DistributedDataParallel wrapper (forward through the wrapper, so that DDP
    sees the pass; other methods such as ``lm_logits`` on the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _tensors(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    enc = batch.encoding.to(device)
    return {"input_ids": enc.input_ids, "token_type_ids": enc.token_type_ids, "attention_mask": enc.attention_mask}


class Objective:
    """Base: ``backward(model, batch, ctx)`` accumulates gradients and returns the loss parts.

    ``model`` may be DDP-wrapped; everything an objective needs about the step comes in ``batch``
    (this process's rows, and for stage 2 the global batch's sources) and ``ctx`` (the run)."""

    name = "objective"

    def backward(self, model: RoFormerSim, batch: Batch, ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError


class _PairedObjective(Objective):
    """UniLM generation plus a loss coupling the pooled vectors of the whole (global) batch."""

    part_name = "sim"

    def __init__(self, gen_weight: float = 1.0, rdrop_alpha: float = 0.0):
        self.gen_weight = gen_weight
        self.rdrop_alpha = rdrop_alpha  # > 0: R-Drop on the generation loss (a second dropout pass)

    def coupled_loss(self, batch: Batch) -> tuple[Callable[..., torch.Tensor], dict]:
        raise NotImplementedError

    def backward(self, model: RoFormerSim, batch: Batch, ctx: StepContext) -> dict[str, float]:
        tensors = _tensors(batch, ctx.device)
        inner = unwrap(model)
        local_targets = int(generation_target_mask(tensors["token_type_ids"], tensors["attention_mask"]).sum())
        global_targets = _all_reduce_sum(local_targets, ctx)
        chunked = ctx.chunk_size > 0
        gen_seen: list[float] = []
        kl_seen: list[float] = []

        def encode(b: dict[str, torch.Tensor]):
            out = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], mask="unilm")
            if self.rdrop_alpha > 0:  # R-Drop: ½(CE1 + CE2) + (α/2)·SKL over a second dropout pass
                out2 = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], mask="unilm")
                rd = generation_rdrop_sum(inner, out.last_hidden_state, out2.last_hidden_state, b["input_ids"],
                                          b["token_type_ids"], b["attention_mask"], self.rdrop_alpha)
                gen = rd.loss
                if not chunked or not torch.is_grad_enabled():
                    kl_seen.append(float(self.gen_weight * rd.consistency.detach() / global_targets))
            else:
                gen = gen_loss_sum(inner, out.last_hidden_state, b["input_ids"], b["token_type_ids"], b["attention_mask"])
            gen = self.gen_weight * gen / global_targets
            if not chunked or not torch.is_grad_enabled():  # count each chunk once
                gen_seen.append(float(gen.detach()))
            return out.pooled, gen

        loss_fn, loss_kwargs = self.coupled_loss(batch)
        total = contrastive_backward(
            encode, tensors, loss_fn, ctx.chunk_size if chunked else None, module=model,
            loss_kwargs=loss_kwargs, autocast_dtype=ctx.autocast_dtype, distributed=ctx.world > 1,
        )
        gen_local = sum(gen_seen)
        coupled = float(total) - gen_local  # the coupled loss is the same on every process
        gen = _all_reduce_sum(gen_local, ctx)
        kl = _all_reduce_sum(sum(kl_seen), ctx) if self.rdrop_alpha > 0 else 0.0
        parts = {"loss": gen + coupled, "gen": (gen - kl) / self.gen_weight if self.gen_weight else 0.0,
                 self.part_name: coupled}
        if self.rdrop_alpha > 0:
            parts["rdrop"] = kl
        return parts


class Stage1Objective(_PairedObjective):
    """L_gen + L_sim (in-batch contrastive over pooled vectors, rows 2k/2k+1 positives)."""

    name = "stage1"
    part_name = "sim"

    def __init__(self, scale: float = 20.0, gen_weight: float = 1.0, sim_weight: float = 1.0,
                 rdrop_alpha: float = 0.0):
        super().__init__(gen_weight, rdrop_alpha)
        self.scale, self.sim_weight = scale, sim_weight

    def coupled_loss(self, batch: Batch):
        scale, weight = self.scale, self.sim_weight

        def loss_fn(emb: torch.Tensor) -> torch.Tensor:
            return weight * roformer_sim_contrastive_loss(emb, scale=scale)

        return loss_fn, {}


class Stage2Objective(_PairedObjective):
    """L_gen + λ·mean((S_student − S_teacher)²) with teacher vectors of the rows' clean sources."""

    name = "stage2"
    part_name = "distill"

    def __init__(self, teacher: Teacher, weight: float = 100.0, gen_weight: float = 1.0, rdrop_alpha: float = 0.0):
        super().__init__(gen_weight, rdrop_alpha)
        self.teacher, self.weight = teacher, weight
        self._dim: int | None = None  # the teacher's dimension (every call must give the same)

    def coupled_loss(self, batch: Batch):
        texts = batch.global_sources
        vecs = check_teacher_output(self.teacher.encode(texts), len(texts), self._dim)
        self._dim = vecs.shape[1]
        teacher = torch.from_numpy(np.ascontiguousarray(vecs))
        weight = self.weight

        def loss_fn(emb: torch.Tensor, teacher_vecs: torch.Tensor) -> torch.Tensor:
            return distillation_loss(emb, teacher_vecs.to(emb.device), weight=weight)

        return loss_fn, {"teacher_vecs": teacher}


class MLMObjective(Objective):
    """Whole-word-masked language modelling (warm-up for models trained from scratch)."""

    name = "mlm"

    def backward(self, model: RoFormerSim, batch: Batch, ctx: StepContext) -> dict[str, float]:
        t = _tensors(batch, ctx.device)
        labels = batch.labels.to(ctx.device)
        picked = labels != -100
        global_count = _all_reduce_sum(int(picked.sum()), ctx)
        with _autocast(ctx):
            out = model(t["input_ids"], t["token_type_ids"], t["attention_mask"], mask="bidirectional")
            logits = unwrap(model).lm_logits(out.last_hidden_state[picked]).float()
        loss = F.cross_entropy(logits, labels[picked], reduction="sum") / global_count
        if ctx.world > 1 and out.pooled is not None:  # DDP reduces every parameter: give the pooler its zero gradient
            (loss + 0.0 * out.pooled.float().sum()).backward()
        else:
            loss.backward()
        value = _all_reduce_sum(float(loss.detach()), ctx)
        return {"loss": value, "mlm": value}
