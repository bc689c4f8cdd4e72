"""Closed-form distances between multivariate normal distributions (kexue.fm/archives/8512).

For p = N(μ_p, Σ_p) and q = N(μ_q, Σ_q) in d dimensions, with Δ = μ_p − μ_q:

* ``kl``:            KL(p‖q) = ½[ΔᵀΣ_q⁻¹Δ + Tr(Σ_q⁻¹Σ_p) − d − log det(Σ_q⁻¹Σ_p)]
* ``bhattacharyya``: BD = ⅛ΔᵀΣ̄⁻¹Δ + ½ log(det Σ̄ / √(det Σ_p det Σ_q)),  Σ̄ = (Σ_p + Σ_q)/2
* ``hellinger``:     H² = ½∫(√p − √q)² = 1 − exp(−BD)
* ``w2``:            W₂² = ‖Δ‖² + Tr Σ_p + Tr Σ_q − 2 Tr (Σ_p^½ Σ_q Σ_p^½)^½.  The "Fréchet" form
                     with Tr (Σ_pΣ_q)^½ (FID) is the same number: both traces are Σ √λ(Σ_pΣ_q).

Every function takes means ``(..., d)`` and covariances ``(..., d, d)`` (or variances ``(..., d)``
with ``diagonal=True``) as NumPy arrays or torch tensors, broadcasts the leading dimensions, and
returns float64: a float / NumPy array for NumPy inputs, a tensor (differentiable, on the inputs'
device) when any input is a tensor. ``pairwise=True`` compares every p with every q instead of
broadcasting: batch shapes ``P`` and ``Q`` give a result of shape ``P + Q`` (``(n, m)`` for ``n``
and ``m`` Gaussians), like POT's non-paired mode.

Numerics (the choices, in one place):

* KL and Bhattacharyya use Cholesky factors and triangular solves, never an inverse or ``det``.
* W2 uses the symmetric square root of Σ_p (``eigh``) and the eigenvalues of Σ_p^½ Σ_q Σ_p^½
  (``eigvalsh``), eigenvalues below d·eps·λ_max taken as 0: real, and exact for positive
  *semi*-definite inputs (no ``sqrtm`` with complex output, no √(rounding noise)).  Its gradient
  through Σ_p^½ uses the Daleckii–Krein formula 1/(√λ_i + √λ_j), which stays finite at repeated
  eigenvalues (e.g. Σ = I), where autograd through ``eigh`` gives NaN.
* A covariance that is not numerically positive definite (Cholesky fails, or a variance ≤ 0) makes
  KL, Bhattacharyya and Hellinger infinite or undefined; such a covariance is replaced by
  Σ + εI with ε = 1e-10 × mean variance (raised ×100 up to twice if needed), so rank-deficient
  inputs give large but finite values.  W2 needs no jitter.  ``reg`` adds reg·I to every
  covariance first, if you prefer an explicit regulariser.
* Results are clamped at 0 (rounding can give −1e-16 at p = q); square roots (``w2`` and
  ``hellinger`` with ``squared=False``) have gradient 0 at 0 instead of NaN.  Differentiate the
  squared forms if you need a smooth objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from rosim.closed_forms._arrays import ArrayLike, as_float64, back
from rosim.errors import InputError

__all__ = ["Gaussian", "bhattacharyya", "fit_gaussian", "hellinger", "kl", "w2"]

_EPS = float(np.finfo(np.float64).eps)
_JITTER = 1e-10
_PAIR_BUDGET = 1 << 22  # float64 elements per (chunk × m × d × d) intermediate in pairwise mode


class Gaussian(NamedTuple):
    """A normal distribution: ``mean`` (..., d) and ``cov`` (..., d, d), or variances (..., d)."""

    mean: Any
    cov: Any


# --------------------------------------------------------------------------- public functions


def kl(mean_p: ArrayLike, cov_p: ArrayLike, mean_q: ArrayLike, cov_q: ArrayLike, *,
       diagonal: bool = False, pairwise: bool = False, reg: float = 0.0) -> Any:
    """KL(p‖q) between Gaussians p = N(mean_p, cov_p) and q = N(mean_q, cov_q).

    Parameters
    ----------
    mean_p, cov_p, mean_q, cov_q
        Means ``(..., d)``; covariances ``(..., d, d)``, or variances ``(..., d)`` if ``diagonal``.
    diagonal
        Covariances are given as variances (diagonal matrices): O(d) per pair.
    pairwise
        Every p against every q: result shape ``batch_p + batch_q``. Otherwise batches broadcast.
    reg
        Added to every variance (reg·I to every covariance) before computing.

    Returns
    -------
    float, ndarray or Tensor
        float64, ≥ 0, one value per (broadcast or pairwise) pair.
    """
    return _evaluate("kl", mean_p, cov_p, mean_q, cov_q, diagonal, pairwise, reg)


def bhattacharyya(mean_p: ArrayLike, cov_p: ArrayLike, mean_q: ArrayLike, cov_q: ArrayLike, *,
                  diagonal: bool = False, pairwise: bool = False, reg: float = 0.0) -> Any:
    """Bhattacharyya distance −log ∫√(pq) between two Gaussians (symmetric). Arguments as `kl`."""
    return _evaluate("bd", mean_p, cov_p, mean_q, cov_q, diagonal, pairwise, reg)


def hellinger(mean_p: ArrayLike, cov_p: ArrayLike, mean_q: ArrayLike, cov_q: ArrayLike, *,
              squared: bool = False, diagonal: bool = False, pairwise: bool = False,
              reg: float = 0.0) -> Any:
    """Hellinger distance H, with H² = ½∫(√p − √q)² = 1 − exp(−BD) ∈ [0, 1].

    ``squared=True`` returns H². Other arguments as `kl`.
    """
    bd, to_numpy = _evaluate("bd", mean_p, cov_p, mean_q, cov_q, diagonal, pairwise, reg, raw=True)
    h2 = -torch.expm1(-bd)
    return back(h2 if squared else _sqrt0(h2), to_numpy)


def w2(mean_p: ArrayLike, cov_p: ArrayLike, mean_q: ArrayLike, cov_q: ArrayLike, *,
       squared: bool = False, diagonal: bool = False, pairwise: bool = False, reg: float = 0.0) -> Any:
    """2-Wasserstein distance W₂ between two Gaussians (Bures–Wasserstein, = Fréchet distance).

    Exact for positive semi-definite covariances. ``squared=True`` returns W₂² (the smooth one, and
    what FID reports). Other arguments as `kl`.
    """
    d2, to_numpy = _evaluate("w2", mean_p, cov_p, mean_q, cov_q, diagonal, pairwise, reg, raw=True)
    return back(d2 if squared else _sqrt0(d2), to_numpy)


def fit_gaussian(samples: ArrayLike, *, diagonal: bool = False, ddof: int = 1,
                 shrinkage: float | str | None = None) -> Gaussian:
    """Mean and covariance of ``samples`` ``(..., n, d)``: the Gaussian to compare with the above.

    Parameters
    ----------
    samples
        ``n`` vectors of dimension ``d``; leading dimensions are independent batches.
    diagonal
        Return per-dimension variances ``(..., d)`` instead of covariance matrices.
    ddof
        The covariance divides by ``n − ddof``: 1 (default) is unbiased, as ``np.cov``; 0 is the
        maximum-likelihood estimate.
    shrinkage
        None; a float α in [0, 1] for (1 − α)C + α·(Tr C / d)·I; or ``"auto"`` for the Ledoit–Wolf α
        (scikit-learn's ``ledoit_wolf_shrinkage``). Useful when n is not much larger than d.

    Returns
    -------
    Gaussian
        ``(mean, cov)``, float64, NumPy or torch like ``samples``.
    """
    x, to_numpy = as_float64(samples, "samples")
    if x.ndim < 2:
        raise InputError(f"samples must have shape (..., n, d), got {tuple(x.shape)}")
    n, d = x.shape[-2], x.shape[-1]
    if d == 0:
        raise InputError("samples have dimension d = 0")
    if n - ddof < 1:
        raise InputError(f"fit_gaussian needs more than {ddof} samples (ddof={ddof}), got {n}")
    mean = x.mean(dim=-2)
    xc = x - mean.unsqueeze(-2)
    if diagonal:
        if shrinkage is not None:
            raise InputError("shrinkage applies to full covariances; use diagonal=False")
        return Gaussian(back(mean, to_numpy), back((xc * xc).sum(dim=-2) / (n - ddof), to_numpy))
    cov = xc.transpose(-1, -2) @ xc / (n - ddof)
    cov = (cov + cov.transpose(-1, -2)) / 2
    if shrinkage is not None:
        alpha = _shrinkage_coefficients(xc, shrinkage).to(cov)
        mu = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        a = alpha[..., None, None]
        cov = (1 - a) * cov + a * mu[..., None, None] * eye
    return Gaussian(back(mean, to_numpy), back(cov, to_numpy))


def _shrinkage_coefficients(xc: torch.Tensor, shrinkage: float | str) -> torch.Tensor:
    batch = xc.shape[:-2]
    if isinstance(shrinkage, str):
        if shrinkage != "auto":
            raise InputError(f"shrinkage must be None, a float in [0, 1] or 'auto', got {shrinkage!r}")
        from sklearn.covariance import ledoit_wolf_shrinkage

        flat = xc.detach().cpu().numpy().reshape(-1, *xc.shape[-2:])
        vals = [ledoit_wolf_shrinkage(block, assume_centered=True) for block in flat]
        return torch.tensor(vals, dtype=torch.float64, device=xc.device).reshape(batch)
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, int | float) or not 0 <= shrinkage <= 1:
        raise InputError(f"shrinkage must be None, a float in [0, 1] or 'auto', got {shrinkage!r}")
    return torch.full(batch, float(shrinkage), dtype=torch.float64, device=xc.device)


# --------------------------------------------------------------------------- evaluation driver


def _evaluate(name: str, mean_p, cov_p, mean_q, cov_q, diagonal: bool, pairwise: bool, reg: float,
              raw: bool = False):
    if not isinstance(reg, int | float) or not math.isfinite(reg) or reg < 0:
        raise InputError(f"reg must be a finite number ≥ 0, got {reg!r}")
    p, q, to_numpy = _inputs(mean_p, cov_p, mean_q, cov_q, diagonal, reg)
    prep, pair = _KERNELS[(name, diagonal)]
    if pairwise:
        (mp, cp), (mq, cq) = (_expand(*p, diagonal), _expand(*q, diagonal))
        bp, bq = mp.shape[:-1], mq.shape[:-1]
        fp = prep(mp.reshape(-1, mp.shape[-1]), cp.reshape(-1, *cp.shape[len(bp):]), "p")
        fq = prep(mq.reshape(-1, mq.shape[-1]), cq.reshape(-1, *cq.shape[len(bq):]), "q")
        n, m, d = fp[0].shape[0], fq[0].shape[0], mp.shape[-1]
        per_row = max(1, m * (d if diagonal else d * d))
        step = max(1, _PAIR_BUDGET // per_row)
        rows = []
        for i in range(0, n, step):
            fpi = tuple(t[i:i + step].unsqueeze(1) for t in fp)
            fqi = tuple(t.unsqueeze(0) for t in fq)
            rows.append(pair(fpi, fqi))
        out = (torch.cat(rows) if rows else mp.new_zeros((0, m))).reshape(*bp, *bq)
    else:
        out = pair(prep(*p, "p"), prep(*q, "q"))
    out = out.clamp(min=0.0)
    return (out, to_numpy) if raw else back(out, to_numpy)


def _expand(m: torch.Tensor, c: torch.Tensor, diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k = 1 if diagonal else 2
    batch = torch.broadcast_shapes(m.shape[:-1], c.shape[:-k])
    return m.expand(*batch, m.shape[-1]), c.expand(*batch, *c.shape[-k:])


def _inputs(mean_p, cov_p, mean_q, cov_q, diagonal: bool, reg: float):
    """Validate and convert the four inputs: ((mean_p, cov_p), (mean_q, cov_q)), to_numpy."""
    names = ("mean_p", "cov_p", "mean_q", "cov_q")
    raw = (mean_p, cov_p, mean_q, cov_q)
    tols = [_sym_tol(x) for x in raw]
    conv = [as_float64(x, nm) for x, nm in zip(raw, names, strict=True)]
    ts = [t for t, _ in conv]
    to_numpy = all(fn for _, fn in conv)
    devices = {t.device for t, x in zip(ts, raw, strict=True) if isinstance(x, torch.Tensor)}
    if len(devices) > 1:
        raise InputError(f"inputs are on different devices: {sorted(map(str, devices))}")
    if devices:
        dev = devices.pop()
        ts = [t.to(dev) for t in ts]
    out = []
    for side, (m, c, tol) in enumerate(((ts[0], ts[1], tols[1]), (ts[2], ts[3], tols[3]))):
        mn, cn = names[2 * side], names[2 * side + 1]
        if m.ndim < 1 or m.shape[-1] == 0:
            raise InputError(f"{mn} must have shape (..., d) with d ≥ 1, got {tuple(m.shape)}")
        d = m.shape[-1]
        if diagonal:
            if c.ndim < 1 or c.shape[-1] != d:
                raise InputError(f"{cn} must hold variances of shape (..., {d}) to match {mn} "
                                 f"{tuple(m.shape)}, got {tuple(c.shape)}")
            if bool((c < 0).any()):
                raise InputError(f"{cn} has negative variances: a covariance must be positive semi-definite")
            cb = c.shape[:-1]
            if reg:
                c = c + reg
        else:
            if c.ndim < 2 or c.shape[-2:] != (d, d):
                raise InputError(f"{cn} must have shape (..., {d}, {d}) to match {mn} {tuple(m.shape)}, "
                                 f"got {tuple(c.shape)}")
            ct = c.transpose(-1, -2)
            scale = c.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-300)
            asym = ((c.detach() - ct.detach()).abs() / scale).max() if c.numel() else 0.0
            if float(asym) > tol:
                raise InputError(f"{cn} is not symmetric (max |Σ − Σᵀ| / max |Σ| = {float(asym):.2e}); "
                                 "a covariance matrix must be symmetric")
            c = (c + ct) / 2
            cb = c.shape[:-2]
            if reg:
                c = c + reg * torch.eye(d, dtype=c.dtype, device=c.device)
        try:
            torch.broadcast_shapes(m.shape[:-1], cb)
        except RuntimeError:
            raise InputError(f"{mn} {tuple(m.shape)} and {cn} {tuple(c.shape)} have batch shapes that "
                             "do not broadcast") from None
        out.append((m, c))  # not expanded: a covariance shared by many means is factorised once
    (mp, _), (mq, _) = out
    if mp.shape[-1] != mq.shape[-1]:
        raise InputError(f"p and q have different dimensions: mean_p {tuple(mp.shape)}, "
                         f"mean_q {tuple(mq.shape)}")
    return out[0], out[1], to_numpy


def _sym_tol(x) -> float:
    """Relative asymmetry tolerated in a covariance, from the precision it arrives in."""
    dtype = x.dtype if isinstance(x, torch.Tensor | np.ndarray) else np.float64
    if dtype in (torch.float16, torch.bfloat16, np.float16):
        return 1e-2
    if dtype in (torch.float32, np.float32):
        return 1e-5
    return 1e-9


# --------------------------------------------------------------------------- numerics


def _sqrt0(x: torch.Tensor) -> torch.Tensor:
    """√x for x ≥ 0 with gradient 0 (not ∞/NaN) where x = 0."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _cholesky_jittered(c: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cholesky factor of each covariance; numerically singular ones get Σ + εI first.

    Returns the (possibly jittered) matrices, their Cholesky factors and log determinants.
    """
    d = c.shape[-1]
    diag = torch.diagonal(c.detach(), dim1=-2, dim2=-1)
    scale = diag.mean(-1).clamp(min=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    jitter = torch.zeros_like(scale)
    cj = c
    for attempt in range(4):
        cj = c + jitter[..., None, None] * eye if attempt else c
        L, info = torch.linalg.cholesky_ex(cj)
        ld = torch.diagonal(L.detach(), dim1=-2, dim2=-1)
        failed = (info != 0) | ~torch.isfinite(ld).all(-1)
        bad = failed | (ld.square().amin(-1) <= d * _EPS * diag.amax(-1))
        if not bool(bad.any()) or (attempt == 3 and not bool(failed.any())):
            logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
            return cj, L, logdet
        if attempt == 3:
            break
        jitter = torch.where(bad, scale * (_JITTER * 100.0 ** attempt), jitter)
    evmin = float(torch.linalg.eigvalsh(c.detach()).min())
    raise InputError(f"covariance {who} is not positive semi-definite (smallest eigenvalue {evmin:.3e})")


def _variances_jittered(v: torch.Tensor) -> torch.Tensor:
    d = v.shape[-1]
    vmax = v.detach().amax(-1, keepdim=True)
    bad = v.detach().amin(-1, keepdim=True) <= d * _EPS * vmax
    scale = v.detach().mean(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(bad, v + _JITTER * scale, v)


class _PsdSqrt(torch.autograd.Function):
    """Symmetric square root of a PSD matrix via eigh, with a backward that is finite at ties."""

    @staticmethod
    def forward(ctx, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w, v = torch.linalg.eigh(c)
        tol = w.abs().amax(-1, keepdim=True) * (c.shape[-1] * _EPS)
        s = torch.where(w > tol, w, torch.zeros_like(w)).sqrt()  # below tol: rounding noise, not variance
        ctx.save_for_backward(s, v)
        return (v * s.unsqueeze(-2)) @ v.transpose(-1, -2)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        s, v = ctx.saved_tensors
        denom = s.unsqueeze(-1) + s.unsqueeze(-2)
        k = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
        vt = v.transpose(-1, -2)
        return v @ ((vt @ g @ v) * k) @ vt


def _sum_sqrt_eigs(m: torch.Tensor) -> torch.Tensor:
    """Σ √λ over the eigenvalues of symmetric PSD ``m``.

    Eigenvalues below d·eps·λ_max are rounding noise (their square roots, ~1e-8·√λ_max each, would
    bias rank-deficient cases): they count as 0, with gradient 0, so gradients stay finite.
    """
    lam = torch.linalg.eigvalsh(m)
    tol = lam.detach().abs().amax(-1, keepdim=True) * (m.shape[-1] * _EPS)
    ok = lam > tol
    return torch.where(ok, torch.sqrt(torch.where(ok, lam, torch.ones_like(lam))), torch.zeros_like(lam)).sum(-1)


# each kernel: prep(mean, cov, who) -> tuple of per-Gaussian tensors; pair(fp, fq) -> values


def _kl_prep(m, c, who):
    _, L, logdet = _cholesky_jittered(c, f"cov_{who}")
    return m, L, logdet


def _kl_pair(fp, fq):
    mp, Lp, ldp = fp
    mq, Lq, ldq = fq
    d = mp.shape[-1]
    t = torch.linalg.solve_triangular(Lq, Lp, upper=False)  # L_q⁻¹ L_p, batch dims broadcast
    z = torch.linalg.solve_triangular(Lq, (mp - mq).unsqueeze(-1), upper=False)
    return 0.5 * (t.square().sum((-2, -1)) + z.square().sum((-2, -1)) - d + ldq - ldp)


def _kl_prep_diag(m, v, who):
    v = _variances_jittered(v)
    return m, v, torch.log(v).sum(-1)


def _kl_pair_diag(fp, fq):
    mp, vp, lp = fp
    mq, vq, lq = fq
    d = mp.shape[-1]
    return 0.5 * ((vp / vq).sum(-1) + ((mp - mq).square() / vq).sum(-1) - d + lq - lp)


def _bd_prep(m, c, who):
    cj, _, logdet = _cholesky_jittered(c, f"cov_{who}")
    return m, cj, logdet


def _bd_pair(fp, fq):
    mp, cp, ldp = fp
    mq, cq, ldq = fq
    cbar = (cp + cq) / 2
    _, L, ldbar = _cholesky_jittered(cbar, "(cov_p + cov_q) / 2")
    z = torch.linalg.solve_triangular(L, (mp - mq).unsqueeze(-1), upper=False)
    return 0.125 * z.square().sum((-2, -1)) + 0.5 * ldbar - 0.25 * (ldp + ldq)


def _bd_prep_diag(m, v, who):
    v = _variances_jittered(v)
    return m, v, torch.log(v).sum(-1)


def _bd_pair_diag(fp, fq):
    mp, vp, lp = fp
    mq, vq, lq = fq
    vbar = (vp + vq) / 2
    return 0.125 * ((mp - mq).square() / vbar).sum(-1) + 0.5 * torch.log(vbar).sum(-1) - 0.25 * (lp + lq)


def _w2_prep(m, c, who):
    tr = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)
    evmin = torch.linalg.eigvalsh(c.detach())[..., 0] if c.numel() else None
    if evmin is not None:
        scale = torch.diagonal(c.detach(), dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1e-300)
        worst = float((evmin / scale).min())
        if worst < -1e-8 * max(1, c.shape[-1]):
            raise InputError(f"covariance cov_{who} is not positive semi-definite "
                             f"(smallest eigenvalue {float(evmin.min()):.3e})")
    root = _PsdSqrt.apply(c) if who == "p" else c
    return m, root, tr


def _w2_pair(fp, fq):
    mp, sp, trp = fp
    mq, cq, trq = fq
    cross = _sum_sqrt_eigs(sp @ cq @ sp)
    return (mp - mq).square().sum(-1) + trp + trq - 2 * cross


def _w2_prep_diag(m, v, who):
    return m, _sqrt0(v)


def _w2_pair_diag(fp, fq):
    mp, sp = fp
    mq, sq = fq
    return (mp - mq).square().sum(-1) + (sp - sq).square().sum(-1)


_KERNELS: dict[tuple[str, bool], tuple[Callable, Callable]] = {
    ("kl", False): (_kl_prep, _kl_pair),
    ("kl", True): (_kl_prep_diag, _kl_pair_diag),
    ("bd", False): (_bd_prep, _bd_pair),
    ("bd", True): (_bd_prep_diag, _bd_pair_diag),
    ("w2", False): (_w2_prep, _w2_pair),
    ("w2", True): (_w2_prep_diag, _w2_pair_diag),
}
