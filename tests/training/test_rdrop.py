"""R-Drop losses against hand-computed references, gradients, batch duplication, stage-1 option."""

import dataclasses
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rosim.errors import InputError
from rosim.training.rdrop import (
    RDropLoss,
    duplicate_batch,
    rdrop_consistency_loss,
    rdrop_loss,
    rdrop_mse_loss,
    split_outputs,
    symmetric_kl,
)

torch.set_num_threads(1)

Z1 = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
Z2 = [[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]
Y = [2, 0]


# ------------------------------------------------------------------ a reference written out by hand
def softmax(z):
    e = [math.exp(x) for x in z]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ref_rdrop(z1, z2, y, alpha):
    """Post 8496: CE1 + CE2 + α·½[KL(P2‖P1) + KL(P1‖P2)], per sample, averaged; ours is half of it."""
    total = 0.0
    for a, b, t in zip(z1, z2, y, strict=True):
        p, q = softmax(a), softmax(b)
        total += -math.log(p[t]) - math.log(q[t]) + alpha * 0.5 * (kl(q, p) + kl(p, q))
    return 0.5 * total / len(y)


def ref_su_code(z1, z2, y, alpha):
    """bojone/r-drop: mean(CE over the 2B rows) + mean(kld(p1,p2) + kld(p2,p1)) / 4 * alpha."""
    rows = [(softmax(a), t) for a, t in zip(z1, y, strict=True)] + [(softmax(b), t) for b, t in zip(z2, y, strict=True)]
    ce = sum(-math.log(p[t]) for p, t in rows) / len(rows)
    kld = sum(kl(softmax(a), softmax(b)) + kl(softmax(b), softmax(a)) for a, b in zip(z1, z2, strict=True)) / len(y)
    return ce + kld / 4 * alpha


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


def test_classification_form_matches_hand_reference():
    for alpha in (0.0, 1.0, 4.0):
        got = rdrop_loss(t(Z1), t(Z2), torch.tensor(Y), alpha=alpha)
        assert got.item() == pytest.approx(ref_rdrop(Z1, Z2, Y, alpha), rel=1e-6)
        assert got.item() == pytest.approx(ref_su_code(Z1, Z2, Y, alpha), rel=1e-6)
    # alpha = 0 and identical passes: ordinary cross-entropy
    same = rdrop_loss(t(Z1), t(Z1), torch.tensor(Y), alpha=4.0)
    assert same.item() == pytest.approx(F.cross_entropy(t(Z1), torch.tensor(Y)).item(), rel=1e-6)
    parts = rdrop_loss(t(Z1), t(Z2), torch.tensor(Y), alpha=4.0, return_parts=True)
    assert parts.loss.item() == pytest.approx(parts.task.item() + parts.consistency.item())
    assert RDropLoss(4.0)(t(Z1), t(Z2), torch.tensor(Y)).item() == pytest.approx(parts.loss.item())


def test_kl_only_form_is_the_consistency_term():
    p = [softmax(z) for z in Z1]
    q = [softmax(z) for z in Z2]
    skl = sum(0.5 * (kl(a, b) + kl(b, a)) for a, b in zip(p, q, strict=True)) / 2
    assert symmetric_kl(t(Z1), t(Z2)).item() == pytest.approx(skl, rel=1e-6)
    got = rdrop_consistency_loss(t(Z1), t(Z2), alpha=3.0)
    assert got.item() == pytest.approx(1.5 * skl, rel=1e-6)
    assert RDropLoss(3.0)(t(Z1), t(Z2)).item() == pytest.approx(1.5 * skl, rel=1e-6)
    parts = rdrop_loss(t(Z1), t(Z2), torch.tensor(Y), alpha=3.0, return_parts=True)
    assert parts.consistency.item() == pytest.approx(got.item())
    assert rdrop_consistency_loss(t(Z1), t(Z1), alpha=3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_token_level_form_with_padding_mask():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 4, 0], [2, 3, 3]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # 3 real tokens
    kept = [(0, 0), (0, 1), (1, 0)]
    expected = ref_rdrop([z1[i, j].tolist() for i, j in kept], [z2[i, j].tolist() for i, j in kept],
                         [int(y[i, j]) for i, j in kept], 2.0)
    got = rdrop_loss(z1, z2, y, alpha=2.0, mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # padded positions do not matter, whatever their logits and labels
    z1b, z2b = z1.clone(), z2.clone()
    z1b[~mask], z2b[~mask] = 100.0, -100.0
    assert rdrop_loss(z1b, z2b, y, alpha=2.0, mask=mask).item() == pytest.approx(expected, rel=1e-6)
    # ignore_index is the same as a mask
    y_ign = y.masked_fill(~mask, -100)
    assert rdrop_loss(z1, z2, y_ign, alpha=2.0).item() == pytest.approx(expected, rel=1e-6)
    # reduction="sum" = mean * number of tokens
    assert rdrop_loss(z1, z2, y, alpha=2.0, mask=mask, reduction="sum").item() == pytest.approx(3 * expected, rel=1e-6)


def test_masked_classes_contribute_nothing():
    z1 = torch.tensor([[1.0, 2.0, float("-inf")], [0.5, -1.0, -1e12]])
    z2 = torch.tensor([[0.0, 1.0, float("-inf")], [1.5, 0.0, -1e12]])
    y = torch.tensor([1, 0])
    got = rdrop_loss(z1, z2, y, alpha=4.0)
    expected = ref_rdrop([[1.0, 2.0], [0.5, -1.0]], [[0.0, 1.0], [1.5, 0.0]], [1, 0], 4.0)
    assert torch.isfinite(got) and got.item() == pytest.approx(expected, rel=1e-5)


def test_mse_form_matches_hand_reference():
    f1, f2, y = [0.2, 1.5, -0.3], [0.0, 1.0, 0.4], [0.5, 1.0, 0.0]
    alpha = 2.0
    d1 = sum((a - b) ** 2 for a, b in zip(y, f1, strict=True)) / 3
    d2 = sum((a - b) ** 2 for a, b in zip(y, f2, strict=True)) / 3
    d12 = sum((a - b) ** 2 for a, b in zip(f1, f2, strict=True)) / 3
    # Su's general form D(y,f1) + D(y,f2) + α/2 [D(f2,f1) + D(f1,f2)], halved
    expected = 0.5 * (d1 + d2 + alpha / 2 * (d12 + d12))
    assert rdrop_mse_loss(t(f1), t(f2), t(y), alpha=alpha).item() == pytest.approx(expected, rel=1e-9)
    assert RDropLoss(alpha, distance="mse")(t(f1), t(f2), t(y)).item() == pytest.approx(expected, rel=1e-9)
    # unlabelled: the consistency term only
    assert rdrop_mse_loss(t(f1), t(f2), alpha=alpha).item() == pytest.approx(alpha / 2 * d12, rel=1e-9)
    # vector outputs: squared distance summed over the output dimension, averaged over samples
    v1, v2, vy = t([[1.0, 0.0], [0.0, 2.0]]), t([[0.0, 0.0], [1.0, 1.0]]), t([[1.0, 1.0], [0.0, 0.0]])
    e = 0.5 * ((1 + 4) / 2 + (2 + 2) / 2) + alpha / 2 * (1 + 2) / 2
    assert rdrop_mse_loss(v1, v2, vy, alpha=alpha).item() == pytest.approx(e, rel=1e-9)


def test_gradients_flow_through_both_passes_and_match_the_formula():
    z1, z2 = t(Z1, requires_grad=True), t(Z2, requires_grad=True)
    y = torch.tensor(Y)
    alpha = 4.0
    rdrop_loss(z1, z2, y, alpha=alpha).backward()
    n = len(Y)
    for mine, other, grad in ((z1, z2, z1.grad), (z2, z1, z2.grad)):
        lp, lq = F.log_softmax(mine.detach(), -1), F.log_softmax(other.detach(), -1)
        p, q = lp.exp(), lq.exp()
        kl_pq = (p * (lp - lq)).sum(-1, keepdim=True)
        d_skl = 0.5 * (p * (lp - lq - kl_pq) + p - q)  # d SKL / d z of this pass
        d_ce = p - F.one_hot(y, 3)
        expected = (0.5 * d_ce + alpha / 2 * d_skl) / n
        assert grad is not None and grad.abs().sum() > 0
        assert torch.allclose(grad, expected, atol=1e-12)


def test_duplicate_and_split_round_trip_and_dropout_passes_differ():
    x = torch.arange(12.0).view(3, 4)
    batch = {"x": x, "mask": torch.ones(3, 4, dtype=torch.long), "names": ["a", "b", "c"]}
    for mode in ("concat", "interleave"):
        dup = duplicate_batch(batch, mode)
        assert dup["x"].shape == (6, 4) and dup["names"] == ["a", "b", "c"]
        a, b = split_outputs(dup["x"], mode)
        assert torch.equal(a, x) and torch.equal(b, x)
    assert torch.equal(duplicate_batch(x, "interleave")[:2], torch.stack([x[0], x[0]]))
    with pytest.raises(InputError, match="even"):
        split_outputs(torch.zeros(3, 2))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).train()
    inp = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    l1, l2 = split_outputs(net(duplicate_batch(inp)))
    assert not torch.allclose(l1, l2)  # independent dropout masks per row
    loss = rdrop_loss(l1, l2, y, alpha=4.0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in net.parameters())
    assert inp.grad.abs().sum() > 0


class Rows(NamedTuple):
    ids: torch.Tensor
    scale: torch.Tensor
    name: str


@dataclasses.dataclass
class Encoded:
    ids: torch.Tensor
    mask: torch.Tensor


def test_duplicate_batch_walks_pytrees_and_refuses_containers_it_cannot_see():
    ids = torch.arange(6).view(3, 2)
    dup = duplicate_batch((Rows(ids, torch.tensor(2.0), "r"), None), "interleave")
    assert isinstance(dup, tuple) and isinstance(dup[0], Rows) and dup[1] is None
    assert torch.equal(dup[0].ids, ids.repeat_interleave(2, dim=0)) and dup[0].name == "r"
    assert torch.equal(dup[0].scale, torch.tensor(2.0))  # 0-dim: kept
    first, second = split_outputs(dup[0], "interleave")
    assert torch.equal(first.ids, ids) and torch.equal(second.ids, ids) and first.name == "r"

    with pytest.raises(InputError, match="no tensor with a row dimension"):  # an unregistered dataclass is a leaf
        duplicate_batch(Encoded(ids, torch.ones(3, 2)))
    with pytest.raises(InputError, match="no tensor"):
        split_outputs(["a", "b"])


def test_bad_inputs():
    with pytest.raises(InputError, match="same shape"):
        rdrop_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="labels must lie"):
        rdrop_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(InputError, match="alpha"):
        rdrop_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), alpha=-1)
    with pytest.raises(InputError, match="masked out"):
        rdrop_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), mask=torch.zeros(2, dtype=torch.bool))
    with pytest.raises(InputError, match="mask must have shape"):
        symmetric_kl(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool))


# ------------------------------------------------------------------ the stage-1 option
def test_stage1_rdrop_alpha_option(tmp_path):
    from rosim.training.stages import Stage1Objective, StepContext
    from rosim.training.trainer import set_dropout
    from tests.helpers import tiny_model

    model, tok = tiny_model(seed=0)
    model.train()
    pairs = [("今天天气不错", "今天天气很好"), ("我喜欢北京", "我不喜欢北京")]
    rows = [tok.build_inputs(tok.encode_ids(s), tok.encode_ids(d), 32) for a, b in pairs for s, d in ((a, b), (b, a))]
    from rosim.training.data import Batch

    batch = Batch(tok.pad(rows), [a for a, b in pairs for a in (a, b)], [False] * 4)
    ctx = StepContext()

    def run(alpha):
        model.zero_grad()
        torch.manual_seed(1)
        parts = Stage1Objective(rdrop_alpha=alpha).backward(model, batch, ctx)
        return parts, [p.grad.clone() for p in model.parameters()]

    plain, g_plain = run(0.0)
    same, g_same = run(4.0)  # dropout 0: the two passes agree, the KL is 0 and R-Drop is plain training
    assert same["rdrop"] == pytest.approx(0.0, abs=1e-7)
    assert same["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_same, strict=True))
    set_dropout(model, 0.3)
    noisy, _ = run(4.0)
    assert noisy["rdrop"] > 0 and noisy["loss"] == pytest.approx(noisy["gen"] + noisy["rdrop"] + noisy["sim"], rel=1e-5)

    from rosim.training.config import config_from_dict

    cfg = config_from_dict({"model": {"init": "x"}, "data": {"sources": [{"path": "x"}]}, "loss": {"rdrop_alpha": -1}})
    with pytest.raises(InputError, match="rdrop_alpha"):
        cfg.validate("stage1")
    cfg.loss.rdrop_alpha = 1.0
    with pytest.raises(InputError, match="mlm"):
        cfg.validate("mlm")
