"""The gradient cache gives the full-batch gradient, with dropout, on one or two processes.

Reference with dropout: the *same* chunks forwarded one after the other from the same seed, with
autograd through the whole graph (one backward of the whole-batch loss). Dropout draws its masks
from the global generator in that order, so the reference sees exactly the masks that the cache's
first pass sees; the cache is right only if its second pass replays them.
"""

import contextlib
import os
import tempfile
from typing import NamedTuple

import pytest
import torch
from torch import nn

from rosim.errors import InputError
from rosim.training import gradcache
from rosim.training.gradcache import (
    Args,
    GradCache,
    batch_rows,
    contrastive_backward,
    gradcache_backward,
    split_batch,
)
from rosim.training.losses import query_document_contrastive_loss, roformer_sim_contrastive_loss

VOCAB, LEN = 40, 6


class TinyEncoder(nn.Module):
    """Embedding → dropout → masked mean → MLP with dropout."""

    def __init__(self, dim: int = 16, out: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.drop = nn.Dropout(p)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Dropout(p), nn.Linear(32, out))

    def forward(self, input_ids, attention_mask=None):
        h = self.drop(self.emb(input_ids))
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        return self.mlp(pooled)


class MultiInputEncoder(nn.Module):
    """Takes two positional tensors and keyword arguments (a tensor and plain values)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(3, 8)
        self.drop = nn.Dropout(0.25)

    def forward(self, x, y, *, weight, scale=1.0, activation="tanh"):
        h = self.drop(self.a(x)) + self.b(y) * weight[:, None]
        return scale * (torch.tanh(h) if activation == "tanh" else h)


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _call(model, chunk):
    if isinstance(chunk, Args):
        return model(*chunk.args, **chunk.kwargs)
    return model(**chunk) if isinstance(chunk, dict) else model(chunk)


def _grads(*models):
    seen, out = set(), []
    for m in models:
        if id(m) not in seen:
            seen.add(id(m))
            out += [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
    return out


def _zero(*models):
    for m in models:
        m.zero_grad(set_to_none=True)


def _modules(models):
    return [m for m in (models if isinstance(models, list) else [models]) if isinstance(m, nn.Module)]


def reference(models, batches, loss_fn, chunk, seed, owners=(), **loss_kwargs):
    """Chunk-by-chunk forward from ``seed`` with autograd through the whole graph, then one backward.

    ``owners``: the modules whose gradients to return when ``models`` are plain functions.
    """
    mods = _modules(models) + list(owners)
    _zero(*mods)
    torch.manual_seed(seed)
    reps = [torch.cat([_call(m, c) for c in split_batch(b, chunk)]) for m, b in zip(models, batches, strict=True)]
    loss = loss_fn(*reps, **loss_kwargs)
    loss.backward()
    return loss.detach(), _grads(*mods)


def cached(models, batches, loss_fn, chunk, seed, owners=(), **kw):
    mods = _modules(models) + list(owners)
    _zero(*mods)
    torch.manual_seed(seed)
    loss = gradcache_backward(models, batches, loss_fn, chunk, **kw)
    return loss, _grads(*mods)


def rel_err(got, ref):
    num = sum(float((g - r).pow(2).sum()) for g, r in zip(got, ref, strict=True)) ** 0.5
    den = sum(float(r.pow(2).sum()) for r in ref) ** 0.5
    return num / den


def assert_same(got, ref, tol=1e-5):
    assert len(got) == len(ref)
    assert rel_err(got, ref) < tol
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * float(r.abs().max()) + 1e-12)


def _towers():
    torch.manual_seed(0)
    return TinyEncoder(), TinyEncoder()


def _qd_loss(q, d, hn):
    return query_document_contrastive_loss(q, d, scale=20.0, hard_negatives=hn)


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("chunk", [1, 3, 4, 12])
def test_equals_one_full_batch_forward_without_dropout(chunk):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    batch = _ids(12)
    loss_ref = roformer_sim_contrastive_loss(model(**batch))
    loss_ref.backward()
    ref = _grads(model)
    loss, got = cached([model], [batch], roformer_sim_contrastive_loss, chunk, seed=1)
    assert_same(got, ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)


@pytest.mark.parametrize("chunk", [2, 5])
def test_roformer_loss_with_dropout_equals_full_batch(chunk):
    torch.manual_seed(0)
    model = TinyEncoder().train()
    batch = _ids(16)
    loss_ref, ref = reference([model], [batch], roformer_sim_contrastive_loss, chunk, seed=7)
    loss, got = cached([model], [batch], roformer_sim_contrastive_loss, chunk, seed=7)
    assert_same(got, ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    # and dropout really is active: another seed gives another gradient
    _, other = reference([model], [batch], roformer_sim_contrastive_loss, chunk, seed=8)
    assert rel_err(other, ref) > 1e-2


def test_query_document_loss_with_hard_negatives_and_dropout_equals_full_batch():
    q_enc, d_enc = _towers()
    batches = [_ids(8, 1), _ids(8, 2), _ids(16, 3)]  # queries, positives, 2 hard negatives per query
    models = [q_enc, d_enc, d_enc]  # the document tower encodes positives and hard negatives
    loss_ref, ref = reference(models, batches, _qd_loss, 3, seed=11)
    loss, got = cached(models, batches, _qd_loss, 3, seed=11)
    assert_same(got, ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_tied_towers_same_module():
    torch.manual_seed(0)
    enc = TinyEncoder()
    batches = [_ids(6, 1), _ids(6, 2)]
    loss_fn = lambda q, d: _qd_loss(q, d, None)  # noqa: E731
    _, ref = reference([enc, enc], batches, loss_fn, 4, seed=2)
    _, got = cached(enc, batches, loss_fn, 4, seed=2)  # one model for every batch
    assert_same(got, ref)


def _without_replay(monkeypatch):
    """The second pass runs from the current random state instead of the recorded one (new dropout masks)."""
    monkeypatch.setattr(gradcache.RandomState, "replay", lambda self: contextlib.nullcontext())


def test_fails_without_random_state_replay(monkeypatch):
    torch.manual_seed(0)
    model = TinyEncoder().train()
    batch = _ids(16)
    _, ref = reference([model], [batch], roformer_sim_contrastive_loss, 4, seed=7)
    _, got = cached([model], [batch], roformer_sim_contrastive_loss, 4, seed=7)
    assert_same(got, ref)
    _without_replay(monkeypatch)
    _, broken = cached([model], [batch], roformer_sim_contrastive_loss, 4, seed=7)
    assert rel_err(broken, ref) > 1e-2


def test_multi_input_model_with_kwargs_and_loss_kwargs():
    torch.manual_seed(0)
    model = MultiInputEncoder()
    g = torch.Generator().manual_seed(4)
    x, y, w = torch.randn(10, 5, generator=g), torch.randn(10, 3, generator=g), torch.rand(10, generator=g)
    batch = Args(x, y, weight=w, scale=torch.tensor(1.5), activation="tanh")
    loss_ref, ref = reference([model], [batch], roformer_sim_contrastive_loss, 4, seed=3, scale=30.0)
    loss, got = cached([model], [batch], roformer_sim_contrastive_loss, 4, seed=3, loss_kwargs={"scale": 30.0})
    assert_same(got, ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_class_api_tuple_input_loss_parameters_and_random_state_after_step():
    torch.manual_seed(0)
    model = MultiInputEncoder()
    log_scale = nn.Parameter(torch.tensor(2.0))  # a learnable temperature inside the loss

    def loss_fn(e):
        return roformer_sim_contrastive_loss(e, scale=log_scale.exp())

    g = torch.Generator().manual_seed(5)
    batch = (torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g), torch.ones(8))  # model(*batch)
    wrapped = lambda x, y, w: model(x, y, weight=w)  # noqa: E731
    _, ref = reference([wrapped], [Args(*batch)], loss_fn, 3, seed=9, owners=[model])
    ref = ref + [log_scale.grad.clone()]
    after_ref = torch.get_rng_state()
    _zero(model)
    log_scale.grad = None
    torch.manual_seed(9)
    GradCache(wrapped, 3, loss_fn).step(batch)
    assert_same(_grads(model) + [log_scale.grad], ref)
    assert torch.equal(torch.get_rng_state(), after_ref)  # random state consumed once, as by one pass


def test_aux_loss_per_chunk_is_added_and_backpropagated():
    torch.manual_seed(0)
    model = TinyEncoder()

    def encode(ids, attention_mask):  # returns (embeddings, additive auxiliary loss of the chunk)
        e = model(ids, attention_mask)
        return e, e.pow(2).sum() / 12

    batch = Args(_ids(12)["input_ids"], _ids(12)["attention_mask"])
    _zero(model)
    torch.manual_seed(4)
    outs = [encode(*c.args) for c in split_batch(batch, 5)]
    loss_ref = roformer_sim_contrastive_loss(torch.cat([o[0] for o in outs])) + sum(o[1] for o in outs)
    loss_ref.backward()
    ref = _grads(model)
    loss, got = cached([encode], [batch], roformer_sim_contrastive_loss, 5, seed=4, owners=[model])
    assert_same(got, ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_grad_scaler_gives_scaled_gradients_and_unscaled_loss():
    torch.manual_seed(0)
    model = TinyEncoder()
    batch = _ids(8)
    loss_ref, ref = reference([model], [batch], roformer_sim_contrastive_loss, 3, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    loss, got = cached([model], [batch], roformer_sim_contrastive_loss, 3, seed=1, scaler=scaler)
    assert_same(got, [256.0 * r for r in ref])
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_bfloat16_autocast_is_close_to_float32():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    batch = _ids(8)
    _, ref = reference([model], [batch], roformer_sim_contrastive_loss, 4, seed=1)
    loss, got = cached([model], [batch], roformer_sim_contrastive_loss, 4, seed=1, autocast_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32
    assert rel_err(got, ref) < 5e-2


@pytest.mark.parametrize("chunk", [None, 3])
def test_contrastive_backward_hook(chunk):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    batch = _ids(10)
    loss_ref = roformer_sim_contrastive_loss(model(**batch))
    loss_ref.backward()
    ref = _grads(model)
    _zero(model)
    loss = contrastive_backward(lambda b: model(**b), batch, roformer_sim_contrastive_loss, chunk, module=model)
    assert_same(_grads(model), ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_no_sync_on_all_but_the_last_chunk_of_each_module():
    calls = []

    class Syncing(TinyEncoder):
        in_no_sync = False

        @contextlib.contextmanager
        def no_sync(self):
            self.in_no_sync = True
            yield
            self.in_no_sync = False

        def forward(self, *a, **k):
            if torch.is_grad_enabled():
                calls.append((self.name, self.in_no_sync))
            return super().forward(*a, **k)

    torch.manual_seed(0)
    q, d = Syncing(), Syncing()
    q.name, d.name = "q", "d"
    GradCache([q, d, d], [2, 3, 4], _qd_loss).step(_ids(4), _ids(4), _ids(8))
    assert calls == [("q", True), ("q", False), ("d", True), ("d", True), ("d", True), ("d", False)]


def test_realistic_encoder_transformers_roformer_with_dropout(monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RoFormerConfig(
        vocab_size=VOCAB, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=64,
    )

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.roformer = transformers.RoFormerModel(cfg)
            self.pooler = nn.Linear(32, 32)

        def forward(self, input_ids, attention_mask):
            return self.pooler(self.roformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])

    torch.manual_seed(0)
    model = Encoder().train()
    batch = _ids(8)
    loss_ref, ref = reference([model], [batch], roformer_sim_contrastive_loss, 3, seed=5)
    loss, got = cached([model], [batch], roformer_sim_contrastive_loss, 3, seed=5)
    assert_same(got, ref)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    _without_replay(monkeypatch)
    _, broken = cached([model], [batch], roformer_sim_contrastive_loss, 3, seed=5)
    assert rel_err(broken, ref) > 1e-3


# ------------------------------------------------------------------------------- bad input


def _model():
    torch.manual_seed(0)
    return TinyEncoder()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, r"chunk_size must be between 1 and the batch size of batch \(8 rows\), got 0"),
        ({"chunk_size": -2}, "got -2"),
        ({"chunk_size": 9}, r"batch size of batch \(8 rows\), got 9"),
        ({"chunk_size": 2.0}, "must be an int"),
        ({"batches": [{"input_ids": _ids(8)["input_ids"], "attention_mask": _ids(7)["attention_mask"]}]},
         r"mismatched batch sizes in batch: batch\['input_ids'\] has 8, batch\['attention_mask'\] has 7"),
        ({"batches": [{"input_ids": _ids(0)["input_ids"]}]}, "empty"),
        ({"batches": ["text"]}, "no tensor"),
        ({"loss_fn": lambda e: e.sum(1)}, r"scalar \(0-dim\) tensor, got shape \(8,\)"),
        ({"loss_fn": lambda e: 1.0}, "must return a scalar tensor, got float"),
        ({"loss_fn": lambda e: torch.tensor(1.0)}, "does not depend on the embeddings"),
        ({"models": [_model(), _model()]}, "got 2 models for 1 batches"),
        ({"rep_fn": lambda out: out[:1]}, "one embedding row per input row"),
        ({"rep_fn": lambda out: {"emb": out}}, "pass rep_fn"),
    ],
)
def test_bad_input_raises_input_error(kwargs, message):
    args = {"models": _model(), "batches": [_ids(8)], "loss_fn": roformer_sim_contrastive_loss, "chunk_size": 3}
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        gradcache_backward(args.pop("models"), args.pop("batches"), args.pop("loss_fn"), args.pop("chunk_size"), **args)


def test_plain_full_batch_hook_checks_the_loss_like_the_cache():
    model = _model()
    for chunk in (None, 3):
        with pytest.raises(InputError, match=r"scalar \(0-dim\) tensor, got shape \(8,\)"):
            contrastive_backward(lambda b: model(**b), _ids(8), lambda e: e.sum(1), chunk)


def test_phase_two_caches_the_scaled_loss_gradient_of_each_input_in_its_dtype():
    class Times8:
        def scale(self, x):
            return 8 * x

    g = torch.Generator().manual_seed(0)
    used, unused = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g).bfloat16()
    loss, cache = gradcache._embedding_gradients(
        [used, unused], lambda a, b: roformer_sim_contrastive_loss(a), None, Times8(), world=1, rank=0,
    )
    leaf = used.clone().requires_grad_()
    expected_loss = roformer_sim_contrastive_loss(leaf)
    (expected,) = torch.autograd.grad(expected_loss, leaf)
    assert not loss.requires_grad and loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    torch.testing.assert_close(cache[0], 8 * expected)
    assert cache[1].dtype == torch.bfloat16 and not cache[1].any()  # the loss ignores it: zeros


def test_bad_chunk_size_in_constructor_and_for_one_of_several_batches():
    with pytest.raises(InputError, match="positive int"):
        GradCache(_model(), 0, roformer_sim_contrastive_loss)
    with pytest.raises(InputError, match=r"batches\[1\] \(4 rows\), got 6"):
        GradCache(_model(), 6, _qd_loss).step(_ids(8), _ids(4), _ids(8))


# ------------------------------------------------------------------------------- batches as trees


class Tagged(NamedTuple):
    ids: torch.Tensor
    tag: str


def test_split_batch_walks_args_namedtuples_and_dicts_and_keeps_other_leaves():
    x = torch.arange(10).view(5, 2)
    batch = Args(x, Tagged(x + 1, "t"), flag=True, scale=torch.tensor(2.0), nested={"m": [x * 2]})
    chunks = split_batch(batch, 2)
    assert [batch_rows(c) for c in chunks] == [2, 2, 1]
    last = chunks[-1]
    assert isinstance(last, Args) and isinstance(last.args[1], Tagged) and last.args[1].tag == "t"
    assert torch.equal(last.args[0], x[4:]) and torch.equal(last.args[1].ids, x[4:] + 1)
    assert last.kwargs["flag"] is True and torch.equal(last.kwargs["scale"], torch.tensor(2.0))  # 0-dim: unsplit
    assert torch.equal(last.kwargs["nested"]["m"][0], x[4:] * 2)
    assert torch.equal(torch.cat([c.args[0] for c in chunks]), x)


def test_mismatched_rows_name_each_tensor_by_its_path():
    batch = Args(torch.zeros(5), Tagged(torch.zeros(4), "t"), w=[torch.zeros(3)])
    with pytest.raises(InputError, match=r"batch\.args\[0\] has 5, batch\.args\[1\]\.ids has 4, "
                                         r"batch\.kwargs\['w'\]\[0\] has 3 rows"):
        batch_rows(batch)


# ------------------------------------------------------------------------------- two processes


def _worker(rank, world, tmp, seed):
    """Each rank's gradients are its share; DDP sums the shares, as the trainer's DDP does."""
    import torch.distributed as dist

    from rosim.training.loop import data_parallel

    def ddp(module):
        return data_parallel(module, torch.device("cpu"))

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        n = 8 // world
        local = {k: v[rank * n:(rank + 1) * n] for k, v in _ids(8).items()}
        torch.manual_seed(0)
        model = ddp(TinyEncoder().train())
        torch.manual_seed(seed + rank)
        loss1 = GradCache(model, 3, roformer_sim_contrastive_loss).step(local)
        g1 = _grads(model.module)

        q_enc, d_enc = _towers()
        q_ddp, d_ddp = ddp(q_enc), ddp(d_enc)
        b = [_ids(8, 1), _ids(8, 2), _ids(16, 3)]
        local_batches = [{k: v[rank * len(v) // world:(rank + 1) * len(v) // world] for k, v in x.items()} for x in b]
        torch.manual_seed(seed + rank)
        loss2 = GradCache([q_ddp, d_ddp, d_ddp], 3, _qd_loss).step(*local_batches)
        g2 = _grads(q_enc, d_enc)

        # the trainer hook, plain (chunk_size=None) and cached, without dropout
        hook = {}
        for chunk in (None, 3):
            model.module.eval()
            model.zero_grad(set_to_none=True)
            loss = contrastive_backward(lambda x: model(**x), local, roformer_sim_contrastive_loss, chunk, module=model)
            hook[chunk] = (loss, _grads(model.module))
        torch.save({"loss1": loss1, "g1": g1, "loss2": loss2, "g2": g2, "hook": hook}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_single_process_full_batch():
    import torch.multiprocessing as mp

    world, seed = 2, 21
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, tmp, seed), nprocs=world, join=True)
        out = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]

    # reference: one process, the whole batch, each rank's rows forwarded from that rank's seed
    def ref(models, batches, loss_fn):
        _zero(*models)
        reps = [[] for _ in batches]
        for r in range(world):
            torch.manual_seed(seed + r)
            for i, (m, b) in enumerate(zip(models, batches, strict=True)):
                n = len(b["input_ids"]) // world
                local = {k: v[r * n:(r + 1) * n] for k, v in b.items()}
                reps[i] += [m(**c) for c in split_batch(local, 3)]
        loss = loss_fn(*[torch.cat(x) for x in reps])
        loss.backward()
        return loss.detach(), _grads(*models)

    torch.manual_seed(0)
    model = TinyEncoder().train()
    loss1, g1 = ref([model], [_ids(8)], roformer_sim_contrastive_loss)
    loss3, g3 = ref([model.eval()], [_ids(8)], roformer_sim_contrastive_loss)
    q_enc, d_enc = _towers()
    loss2, g2 = ref([q_enc, d_enc, d_enc], [_ids(8, 1), _ids(8, 2), _ids(16, 3)], _qd_loss)
    for o in out:
        assert o["loss1"].item() == pytest.approx(loss1.item(), rel=1e-6)
        assert o["loss2"].item() == pytest.approx(loss2.item(), rel=1e-6)
        assert_same(o["g1"], g1)
        assert_same(o["g2"], g2)
        for loss, g in o["hook"].values():
            assert loss.item() == pytest.approx(loss3.item(), rel=1e-6)
            assert_same(g, g3)
