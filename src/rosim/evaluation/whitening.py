"""BERT-whitening (Su et al. 2021): map vectors so that their mean is 0 and covariance the identity.

``fit_whitening`` computes ``mu`` (the mean) and the kernel ``W = U diag(1/sqrt(s))`` from the SVD
``U diag(s) U^T`` of the covariance of the given vectors; keeping only the first ``K`` columns of
``W`` keeps the ``K`` directions of largest variance (dimensionality reduction).
``apply_whitening`` returns ``(x - mu) W``, L2-normalised by default so that dot products are cosines.
"""

from __future__ import annotations

import numpy as np

from rosim.errors import InputError


def fit_whitening(vectors: np.ndarray, n_components: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(kernel, bias)``: ``kernel`` is ``(d, K)``, ``bias`` is ``-mean`` with shape ``(1, d)``.

    The covariance is the unbiased one (``np.cov``), as in the reference implementation. Singular
    values are floored at ``1e-12 * max`` so that rank-deficient inputs (fewer vectors than
    dimensions) give finite, if noisy, directions instead of infinities.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"whitening needs a 2-D array of vectors, got shape {x.shape}")
    n, d = x.shape
    if n < 2:
        raise InputError(f"whitening needs at least 2 vectors, got {n}")
    if n_components is not None and not 1 <= n_components <= d:
        raise InputError(f"whitening to {n_components} dimensions is impossible for {d}-dimensional vectors")
    mu = x.mean(axis=0, keepdims=True)
    cov = np.cov(x.T)
    u, s, _ = np.linalg.svd(cov)
    s = np.maximum(s, s.max() * 1e-12 if s.max() > 0 else 1e-12)
    kernel = u @ np.diag(1.0 / np.sqrt(s))
    if n_components is not None:
        kernel = kernel[:, :n_components]
    return kernel, -mu


def apply_whitening(vectors: np.ndarray, kernel: np.ndarray, bias: np.ndarray, *,
                    normalize: bool = True) -> np.ndarray:
    """``(x + bias) @ kernel``, then L2-normalised rows when ``normalize``."""
    y = (np.asarray(vectors, dtype=np.float64) + bias) @ kernel
    if normalize:
        y = l2_normalize(y)
    return y


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
