"""In-batch contrastive losses against naive loops, autograd and the post's closed-form gradient."""

import math

import pytest
import torch

from rosim.errors import InputError
from rosim.training.losses import (
    contrastive_embedding_grad,
    pair_targets,
    query_document_contrastive_loss,
    roformer_sim_contrastive_loss,
)


def _emb(n=8, d=5, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _naive_roformer_loss(emb, scale):
    n = emb.shape[0]
    z = [e / e.norm() for e in emb]
    total = 0.0
    for i in range(n):
        partner = i + 1 if i % 2 == 0 else i - 1
        logits = {j: scale * float(z[i] @ z[j]) for j in range(n) if j != i}
        m = max(logits.values())
        lse = m + math.log(sum(math.exp(v - m) for v in logits.values()))
        total += lse - logits[partner]
    return total / n


def test_pair_targets():
    assert pair_targets(6).tolist() == [1, 0, 3, 2, 5, 4]


@pytest.mark.parametrize("scale", [20.0, 30.0, 1.0])
def test_roformer_loss_matches_naive_loop(scale):
    emb = _emb()
    assert roformer_sim_contrastive_loss(emb, scale).item() == pytest.approx(_naive_roformer_loss(emb, scale), rel=1e-12)


def test_roformer_loss_is_scale_invariant_in_the_vectors_and_half_precision_is_upcast():
    emb = _emb(dtype=torch.float32)
    a = roformer_sim_contrastive_loss(emb)
    assert roformer_sim_contrastive_loss(3.7 * emb).item() == pytest.approx(a.item(), rel=1e-5)
    b = roformer_sim_contrastive_loss(emb.bfloat16())
    assert b.dtype == torch.float32 and b.item() == pytest.approx(a.item(), rel=5e-2)


def test_roformer_loss_gradcheck_finite_differences():
    emb = _emb(n=6, d=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: roformer_sim_contrastive_loss(e, 5.0), (emb,))


@pytest.mark.parametrize("scale", [20.0, 1.0])
def test_closed_form_gradient_equals_autograd_of_roformer_loss(scale):
    emb = _emb(n=10, d=6, seed=3).requires_grad_()
    (g,) = torch.autograd.grad(roformer_sim_contrastive_loss(emb, scale), emb)
    torch.testing.assert_close(contrastive_embedding_grad(emb, scale), g, rtol=1e-10, atol=1e-12)


def test_closed_form_in_the_posts_notation_and_with_asymmetric_targets():
    # the post: L = sum_i CE(row i of H Hᵀ, diagonal excluded) and dL/dH = 2 (P_bar - T_bar) H
    h = _emb(n=7, d=3, seed=5).requires_grad_()
    targets = torch.tensor([3, 0, 0, 6, 1, 2, 4])
    eye = torch.eye(7, dtype=torch.bool)
    loss = torch.nn.functional.cross_entropy((h @ h.T).masked_fill(eye, float("-inf")), targets, reduction="sum")
    (g,) = torch.autograd.grad(loss, h)
    closed = contrastive_embedding_grad(h, scale=1.0, targets=targets, normalize=False, reduction="sum")
    torch.testing.assert_close(closed, g, rtol=1e-10, atol=1e-12)


def _naive_qd(q, d, scale, hn):
    docs = torch.cat([d, hn.reshape(-1, d.shape[1])]) if hn is not None else d
    total = 0.0
    for i in range(q.shape[0]):
        logits = torch.stack([scale * torch.cosine_similarity(q[i], x, dim=0) for x in docs])
        total += float(torch.logsumexp(logits, 0) - logits[i])
    return total / q.shape[0]


@pytest.mark.parametrize("hn_shape", [None, (4, 5), (6, 2, 5)])
def test_query_document_loss_matches_naive_loop(hn_shape):
    q, d = _emb(6, 5, 1), _emb(6, 5, 2)
    hn = None if hn_shape is None else torch.randn(*hn_shape, dtype=torch.float64)
    got = query_document_contrastive_loss(q, d, scale=20.0, hard_negatives=hn)
    assert got.item() == pytest.approx(_naive_qd(q, d, 20.0, hn), rel=1e-10)


def test_query_document_loss_unnormalised_is_a_plain_dot_product():
    q, d = _emb(4, 3, 1), _emb(4, 3, 2)
    expected = torch.nn.functional.cross_entropy(2.0 * q @ d.T, torch.arange(4))
    assert query_document_contrastive_loss(q, d, 2.0, normalize=False).item() == pytest.approx(expected.item())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: roformer_sim_contrastive_loss(_emb(7, 3)), "even number"),
        (lambda: roformer_sim_contrastive_loss(torch.randn(8)), "must be 2-D"),
        (lambda: roformer_sim_contrastive_loss(torch.ones(4, 2, dtype=torch.long)), "floating-point"),
        (lambda: query_document_contrastive_loss(_emb(4, 3), _emb(5, 3)), "same shape"),
        (lambda: query_document_contrastive_loss(_emb(4, 3), _emb(4, 3), hard_negatives=_emb(2, 4)), "dimension"),
        (lambda: contrastive_embedding_grad(_emb(4, 3), reduction="max"), "reduction"),
        (lambda: contrastive_embedding_grad(_emb(3, 3), targets=torch.tensor([0, 2, 1])), "another row"),
    ],
)
def test_bad_inputs(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_learnable_scale_gets_a_finite_gradient():
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    roformer_sim_contrastive_loss(_emb(), scale).backward()
    assert torch.isfinite(scale.grad)
