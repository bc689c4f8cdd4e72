"""Spearman against scipy; BERT-whitening against a NumPy reference written out step by step."""

import numpy as np
import pytest
import scipy.stats

from rosim.errors import InputError
from rosim.evaluation import apply_whitening, cosine_scores, fit_whitening, rankdata, spearman


@pytest.mark.parametrize("n, levels", [(2, None), (7, 3), (50, None), (500, 6), (1000, 2)])
def test_spearman_equals_scipy(n, levels):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = 0.6 * x + rng.normal(size=n)
    if levels:  # graded / binary labels: many ties, as in STS-B and ATEC
        y = np.digitize(y, np.quantile(y, np.linspace(0, 1, levels + 1)[1:-1]))
    x[: n // 5] = np.round(x[: n // 5], 1)  # ties on the cosine side too
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


def test_rankdata_equals_scipy():
    x = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], dtype=float)
    np.testing.assert_allclose(rankdata(x), scipy.stats.rankdata(x))


def test_spearman_undefined_and_bad_input():
    assert np.isnan(spearman([1, 2, 3], [1, 1, 1]))
    with pytest.raises(InputError, match="equal lengths"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(InputError, match="NaN"):
        spearman([1, np.nan], [1, 2])


def reference_whitening(vecs, k=None):
    """BERT-whitening as published: mu, cov, SVD, W = U diag(1/sqrt(s)), first k columns."""
    mu = vecs.mean(axis=0, keepdims=True)
    cov = np.cov(vecs.T)
    u, s, _ = np.linalg.svd(cov)
    w = np.dot(u, np.diag(1 / np.sqrt(s)))
    w = w if k is None else w[:, :k]
    y = (vecs - mu).dot(w)
    return y / (y ** 2).sum(axis=1, keepdims=True) ** 0.5


@pytest.mark.parametrize("k", [None, 5])
def test_whitening_equals_numpy_reference(k):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) + 3.0
    kernel, bias = fit_whitening(vecs, k)
    np.testing.assert_allclose(apply_whitening(vecs, kernel, bias), reference_whitening(vecs, k), atol=1e-10)
    # the full transform really whitens: zero mean, identity covariance
    raw = apply_whitening(vecs, *fit_whitening(vecs), normalize=False)
    np.testing.assert_allclose(raw.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(np.cov(raw.T), np.eye(16), atol=1e-8)


def test_cosine_scores_with_whitening_fits_on_both_sides():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    ref = reference_whitening(np.concatenate([a, b]), 4)
    np.testing.assert_allclose(cosine_scores(a, b, "4"), np.einsum("ij,ij->i", ref[:60], ref[60:]), atol=1e-10)
    plain = cosine_scores(a, b, "none")
    np.testing.assert_allclose(plain, (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    with pytest.raises(InputError, match="exceeds the vector dimension"):
        cosine_scores(a, b, "9")


def test_whitening_rank_deficient_stays_finite():
    vecs = np.random.default_rng(2).normal(size=(5, 12))  # fewer vectors than dimensions
    assert np.isfinite(apply_whitening(vecs, *fit_whitening(vecs))).all()
