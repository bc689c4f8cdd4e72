"""Exact von Mises–Fisher sampling on the unit sphere S^{d-1} ⊂ R^d (Wood, 1994).

A vMF(μ, κ) draw is ``z = w μ + sqrt(1 - w²) v`` where ``v`` is uniform on the unit vectors
orthogonal to μ and ``w = z·μ`` has density ∝ e^{κw} (1 - w²)^{(d-3)/2} on [-1, 1]. Wood's rejection
algorithm draws ``w`` exactly:

    b  = (d-1) / (2κ + sqrt(4κ² + (d-1)²))          (the stable form of (-2κ + sqrt(4κ²+(d-1)²))/(d-1))
    x0 = (1 - b) / (1 + b),   c = κ x0 + (d-1) log(1 - x0²)
    repeat:  Z ~ Beta((d-1)/2, (d-1)/2),  U ~ Uniform(0, 1)
             W = (1 - (1+b) Z) / (1 - (1-b) Z)
    until    κ W + (d-1) log(1 - x0 W) - c >= log U

The Beta draw is the ratio of two chi-square sums, X / (X + Y) with X, Y sums of (d-1) squared
standard normals, so every random number comes from ``torch.randn`` / ``torch.rand`` with the
caller's generator: reproducible, on any device, no lookup table. ``w`` is computed in float64.

Because κ is fixed, ``w`` and the Gaussian that gives ``v`` do not depend on μ, so ``z`` is a
differentiable function of μ (the reparameterisation the UniVAE training uses).

The mean resultant length E[z·μ] is A_d(κ) = I_{d/2}(κ) / I_{d/2-1}(κ): :func:`mean_resultant_length`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rosim.errors import InputError


def check_kappa(kappa: float) -> float:
    """κ must be a finite number > 0 (κ → 0 is the uniform distribution: use :func:`sample_uniform_sphere`)."""
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
        raise InputError(f"kappa must be a number > 0, got {kappa!r}")
    if not (math.isfinite(kappa) and kappa > 0):
        raise InputError(
            f"kappa must be a finite number > 0, got {kappa}; kappa is the vMF concentration "
            "(larger = samples closer to the mean direction; the reference uses 32)"
        )
    return float(kappa)


def _check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise InputError(f"the sphere dimension must be an integer >= 2, got {dim!r}")
    return dim


def _beta_symmetric(shape: tuple[int, ...], dim: int, generator, device) -> torch.Tensor:
    """Beta((d-1)/2, (d-1)/2) in float64 as X / (X + Y), X, Y ~ chi²_{d-1}."""
    g = torch.randn(*shape, 2, dim - 1, generator=generator, device=device, dtype=torch.float64)
    chi2 = g.square().sum(-1)
    return chi2[..., 0] / chi2.sum(-1)


def sample_vmf_w(n: int, dim: int, kappa: float, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` exact draws of w = z·μ for vMF on S^{dim-1} with concentration κ (float64, shape (n,))."""
    kappa, dim = check_kappa(kappa), _check_dim(dim)
    device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    m1 = dim - 1
    b = m1 / (2.0 * kappa + math.sqrt(4.0 * kappa * kappa + m1 * m1))
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + m1 * math.log(1.0 - x0 * x0)
    w = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    while todo.numel():
        k = todo.numel()
        z = _beta_symmetric((k,), dim, generator, device)
        u = torch.rand(k, generator=generator, device=device, dtype=torch.float64)
        cand = (1.0 - (1.0 + b) * z) / (1.0 - (1.0 - b) * z)
        accept = kappa * cand + m1 * torch.log1p(-x0 * cand) - c >= torch.log(u)
        w[todo[accept]] = cand[accept]
        todo = todo[~accept]
    return w


def sample_vmf(mu: torch.Tensor, kappa: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """One vMF(μ, κ) sample per row of ``mu`` ``(..., d)``; rows of ``mu`` must be unit vectors.

    Differentiable with respect to ``mu`` (pathwise gradient; κ is fixed).
    """
    if mu.dim() < 1 or mu.shape[-1] < 2:
        raise InputError(f"mu must have a last dimension >= 2 (the sphere's ambient dimension), got shape {tuple(mu.shape)}")
    dim = mu.shape[-1]
    flat = mu.reshape(-1, dim)
    w = sample_vmf_w(flat.shape[0], dim, kappa, generator=generator, device=mu.device).unsqueeze(-1)
    # float64 for the tangent direction: in low dimension eps can be nearly parallel to μ
    mu64 = flat.to(torch.float64)
    eps = torch.randn(flat.shape, generator=generator, device=mu.device, dtype=torch.float64)
    v = F.normalize(eps - (eps * mu64).sum(-1, keepdim=True) * mu64, dim=-1)  # uniform on the unit vectors ⊥ μ
    z = w * mu64 + torch.sqrt((1.0 - w * w).clamp_min(0.0)) * v
    return z.to(mu.dtype).reshape(mu.shape)


def sample_uniform_sphere(shape: tuple[int, ...], dim: int, *, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform draws on S^{dim-1}: normalised standard Gaussians, shape ``(*shape, dim)``."""
    _check_dim(dim)
    device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    while True:
        g = torch.randn(*shape, dim, generator=generator, device=device, dtype=dtype)
        if bool((g.norm(dim=-1) > 0).all()):  # a zero vector has probability 0
            return F.normalize(g, dim=-1)


def mean_resultant_length(dim: int, kappa: float) -> float:
    """A_d(κ) = I_{d/2}(κ) / I_{d/2-1}(κ) = E[z·μ] for vMF on S^{d-1} (scaled Bessel functions, stable for large κ)."""
    from scipy.special import ive

    kappa, dim = check_kappa(kappa), _check_dim(dim)
    return float(ive(dim / 2.0, kappa) / ive(dim / 2.0 - 1.0, kappa))


class VMFSampler:
    """A seeded vMF sampler with fixed κ: ``VMFSampler(kappa=32, seed=0)(mu)``."""

    def __init__(self, kappa: float, *, seed: int | None = None, device: torch.device | str = "cpu"):
        self.kappa = check_kappa(kappa)
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()

    def __call__(self, mu: torch.Tensor) -> torch.Tensor:
        if mu.device != self.generator.device:
            raise InputError(f"mu is on {mu.device} but the sampler's generator is on {self.generator.device}")
        return sample_vmf(mu, self.kappa, generator=self.generator)

    def __repr__(self) -> str:
        return f"VMFSampler(kappa={self.kappa}, device={self.generator.device})"
