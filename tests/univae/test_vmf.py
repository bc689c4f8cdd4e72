"""The vMF sampler against the exact distribution: A_d(κ), the density of w, the sphere, the direction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from rosim.errors import InputError
from rosim.univae.vmf import (
    VMFSampler,
    mean_resultant_length,
    sample_uniform_sphere,
    sample_vmf,
    sample_vmf_w,
)

N = 12_000


def _unit(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)


@pytest.mark.parametrize(("d", "kappa"), [(2, 0.5), (2, 32.0), (3, 5.0), (3, 300.0), (16, 0.5), (16, 32.0),
                                          (16, 300.0), (64, 5.0), (64, 32.0), (64, 300.0)])
def test_mean_resultant_length_matches_bessel_ratio(d, kappa):
    mu = _unit(d, seed=d).expand(N, d).contiguous()
    z = sample_vmf(mu, kappa, generator=torch.Generator().manual_seed(int(kappa * 10) + d))
    w = (z * mu).sum(-1)
    expected = mean_resultant_length(d, kappa)
    se = float(w.std()) / math.sqrt(N)
    assert abs(float(w.mean()) - expected) < 4.5 * se + 1e-6, (float(w.mean()), expected, se)
    # on the unit sphere, and the mean vector points along μ with length A_d(κ)
    assert torch.allclose(z.norm(dim=-1), torch.ones(N, dtype=z.dtype), atol=1e-9)
    mean_vec = z.mean(0)
    assert float((mean_vec - expected * mu[0]).norm()) < 5 * math.sqrt(d) * float(z.std(0).max()) / math.sqrt(N) + 1e-6


def test_bessel_ratio_known_values():
    # d = 3: A_3(κ) = coth κ - 1/κ
    for kappa in (0.1, 1.0, 32.0, 1e4):
        assert mean_resultant_length(3, kappa) == pytest.approx(1 / math.tanh(kappa) - 1 / kappa, rel=1e-9)
    assert mean_resultant_length(16, 1e5) == pytest.approx(1 - 15 / 2e5, rel=1e-6)  # large-κ expansion


def _w_cdf(d: int, kappa: float):
    log_density = lambda w: kappa * (w - 1) + (d - 3) / 2 * np.log1p(-w * w)  # noqa: E731
    norm = integrate.quad(lambda w: np.exp(log_density(w)), -1, 1, limit=200)[0]
    return lambda x: np.array([integrate.quad(lambda w: np.exp(log_density(w)), -1, v, limit=200)[0] for v in np.atleast_1d(x)]) / norm


@pytest.mark.parametrize(("d", "kappa"), [(3, 4.0), (16, 32.0), (5, 0.7)])
def test_w_follows_the_exact_density(d, kappa):
    w = sample_vmf_w(4000, d, kappa, generator=torch.Generator().manual_seed(1)).numpy()
    if d == 3:  # closed form: density ∝ e^{κw}
        cdf = lambda x: (np.exp(kappa * (np.asarray(x) + 1)) - 1) / (np.exp(2 * kappa) - 1)  # noqa: E731
    else:
        grid = np.linspace(-1, 1, 801)
        values = _w_cdf(d, kappa)(grid)
        cdf = lambda x: np.interp(x, grid, values)  # noqa: E731
    assert stats.kstest(w, cdf).pvalue > 1e-3


def test_seeded_and_reproducible_and_differentiable():
    mu = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1).requires_grad_()
    a = sample_vmf(mu, 32.0, generator=torch.Generator().manual_seed(3))
    b = sample_vmf(mu, 32.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32
    (a * torch.arange(16.0)).sum().backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0
    s = VMFSampler(32.0, seed=3)
    assert torch.equal(s(mu.detach()), sample_vmf(mu.detach(), 32.0, generator=torch.Generator().manual_seed(3)))


def test_uniform_sphere():
    u = sample_uniform_sphere((20_000,), 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(u.norm(dim=-1), torch.ones(20_000), atol=1e-5)
    assert float(u.mean(0).norm()) < 0.03  # no preferred direction


@pytest.mark.parametrize("kappa", [0, -1.0, float("nan"), float("inf"), "32", True])
def test_bad_kappa(kappa):
    with pytest.raises(InputError, match="kappa must be"):
        sample_vmf(torch.tensor([[1.0, 0.0]]), kappa)


def test_bad_dimension():
    with pytest.raises(InputError, match="last dimension >= 2"):
        sample_vmf(torch.tensor([[1.0]]), 5.0)
