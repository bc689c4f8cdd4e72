import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.utils._param_validation import InvalidParameterError

from rosim.closed_forms import GaussianLogisticRegression
from rosim.errors import InputError


def blobs(n=300, d=6, k=3, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=spread, size=(k, d))
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    y = rng.integers(0, k, size=n)
    X = centers[y] + rng.normal(size=(n, d)) @ mix
    return X, y


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize(("whiten", "shrinkage"), [(False, None), (False, 0.3), (False, "auto"), (True, None)])
def test_probabilities_equal_sklearn_lda_lsqr(k, whiten, shrinkage):
    # (whiten=True with shrinkage shrinks in whitened coordinates, a documented difference)
    X, y = blobs(k=k, seed=k)
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(X, y)
    ours = GaussianLogisticRegression(shrinkage=shrinkage, whiten=whiten).fit(X, y)
    Xt, _ = blobs(n=200, k=k, seed=100 + k)
    np.testing.assert_allclose(ours.predict_proba(Xt), ref.predict_proba(Xt), rtol=0, atol=1e-8)
    # sklearn's log-proba is log(1 − p) for binary and clips at log(tiny); ours is exact, so compare exp
    np.testing.assert_allclose(np.exp(ours.predict_log_proba(Xt)), ref.predict_proba(Xt), rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.decision_function(Xt), ref.decision_function(Xt), rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(ours.predict(Xt), ref.predict(Xt))
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ours.means_, ref.means_, rtol=1e-12)
    np.testing.assert_allclose(ours.priors_, ref.priors_, rtol=1e-12)
    np.testing.assert_allclose(ours.covariance_, ref.covariance_, rtol=1e-9, atol=1e-12)
    assert ours.coef_.shape == ((1, X.shape[1]) if k == 2 else (k, X.shape[1]))


def test_custom_priors_and_string_labels_match_sklearn():
    X, y = blobs(k=3, seed=7)
    names = np.array(["甲", "乙", "丙"])[y]
    priors = [0.2, 0.5, 0.3]
    ref = LinearDiscriminantAnalysis(solver="lsqr", priors=priors).fit(X, names)
    ours = GaussianLogisticRegression(priors=priors).fit(X, names)
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-8, rtol=0)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))


def test_su_binary_formula_and_whitened_identity():
    """w = (μ1 − μ0)Σ⁻¹, b = ½(μ0Σ⁻¹μ0 − μ1Σ⁻¹μ1) + ln(p1/p0); after whitening Σ = I − Σ p_k μ_kᵀμ_k."""
    X, y = blobs(k=2, seed=3)
    m = GaussianLogisticRegression().fit(X, y)
    mu0, mu1 = m.means_
    p0, p1 = m.priors_
    S = m.covariance_
    w = np.linalg.solve(S, mu1 - mu0)
    b = 0.5 * (mu0 @ np.linalg.solve(S, mu0) - mu1 @ np.linalg.solve(S, mu1)) + np.log(p1 / p0)
    np.testing.assert_allclose(m.coef_[0], w, rtol=1e-10)
    np.testing.assert_allclose(m.intercept_[0], b, rtol=1e-10)
    Z = (X - X.mean(0)) @ np.linalg.cholesky(np.linalg.inv(np.cov(X.T, bias=True)))
    mz = GaussianLogisticRegression().fit(Z, y)
    su = np.eye(Z.shape[1]) - np.einsum("k,ki,kj->ij", mz.priors_, mz.means_, mz.means_)
    np.testing.assert_allclose(mz.covariance_, su, atol=1e-12)


def test_torch_inputs_and_to_linear():
    X, y = blobs(k=4, seed=1)
    a = GaussianLogisticRegression().fit(X, y)
    b = GaussianLogisticRegression().fit(torch.from_numpy(X).float(), torch.from_numpy(y))
    c = GaussianLogisticRegression().fit(torch.from_numpy(X), torch.from_numpy(y))
    np.testing.assert_array_equal(c.coef_, a.coef_)
    np.testing.assert_allclose(b.predict_proba(torch.from_numpy(X)), a.predict_proba(X), atol=1e-5)
    grad = torch.from_numpy(X).requires_grad_()  # e.g. straight from an encoder
    np.testing.assert_array_equal(a.predict(grad), a.predict(X))
    lin = a.to_linear(dtype=torch.float64)
    logits = lin(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), a.predict_proba(X), atol=1e-12)
    Xb, yb = blobs(k=2, seed=2)
    m2 = GaussianLogisticRegression().fit(Xb, yb)
    out = m2.to_linear(dtype=torch.float64)(torch.from_numpy(Xb))
    assert out.shape == (len(Xb), 1)
    np.testing.assert_allclose(torch.sigmoid(out)[:, 0].detach().numpy(), m2.predict_proba(Xb)[:, 1], atol=1e-12)


def test_sklearn_api_clone_and_cross_val():
    X, y = blobs(k=3, seed=4)
    est = GaussianLogisticRegression(shrinkage=0.1)
    assert clone(est).get_params() == {"priors": None, "shrinkage": 0.1, "whiten": False}
    scores = cross_val_score(est, X, y, cv=3)
    assert scores.mean() > 0.7
    with pytest.raises(NotFittedError):
        GaussianLogisticRegression().predict(X)


def test_rank_deficient_and_more_features_than_samples():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 50))
    y = np.arange(20) % 2
    X[:, 5] = 0.0  # a constant feature too
    for whiten in (False, True):
        with pytest.warns(UserWarning, match="singular"):
            m = GaussianLogisticRegression(whiten=whiten).fit(X, y)
        assert np.isfinite(m.coef_).all() and np.isfinite(m.predict_proba(X)).all()
        assert m.predict(X).shape == y.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shrinkage makes Σ regular: no warning
        shrunk = GaussianLogisticRegression(whiten=True, shrinkage="auto").fit(X, y)
    assert shrunk.solver_ == "cholesky" and (shrunk.predict(X) == y).all()
    ref = LinearDiscriminantAnalysis(solver="lsqr").fit(X, y)
    with pytest.warns(UserWarning, match="shrinkage='auto'"):
        m = GaussianLogisticRegression().fit(X, y)
    assert m.solver_ == "lstsq"
    np.testing.assert_allclose(m.predict_proba(X), ref.predict_proba(X), atol=1e-8)


def test_log_proba_is_finite_for_far_points():
    X, y = blobs(k=2, seed=5)
    m = GaussianLogisticRegression().fit(X, y)
    far = X[:3] * 1e6
    lp = m.predict_log_proba(far)
    assert np.isfinite(lp).all()
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0)


def test_save_load_roundtrip(tmp_path):
    X, y = blobs(k=3, seed=6)
    labels = np.array(["正面", "负面", "中性"])[y]
    m = GaussianLogisticRegression(shrinkage="auto", whiten=True).fit(X, labels)
    out = m.save(tmp_path / "clf", metadata={"model": "x"})
    assert sorted(p.name for p in out.iterdir()) == ["arrays.safetensors", "config.json"]
    r = GaussianLogisticRegression.load(out)
    np.testing.assert_array_equal(r.classes_, m.classes_)
    np.testing.assert_array_equal(r.predict_proba(X), m.predict_proba(X))
    assert r.metadata_ == {"model": "x"} and r.get_params() == m.get_params()
    m2 = GaussianLogisticRegression().fit(X, y)  # overwrite our own directory: allowed
    m2.save(out)
    assert GaussianLogisticRegression.load(out).classes_.dtype.kind == "i"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not a saved classifier"):
        m.save(tmp_path / "other")
    with pytest.raises(InputError, match="no saved classifier"):
        GaussianLogisticRegression.load(tmp_path / "missing")


def test_bad_inputs():
    # rosim's own checks raise InputError; array and parameter checks are scikit-learn's (ValueError)
    X, y = blobs(k=2)
    with pytest.raises(InputError, match="only one class"):
        GaussianLogisticRegression().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match=r"inconsistent numbers of samples: \[300, 299\]"):
        GaussianLogisticRegression().fit(X, y[:-1])
    Xn = X.copy()
    Xn[4, 2] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        GaussianLogisticRegression().fit(Xn, y)
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        GaussianLogisticRegression().fit(X[:, 0], y)
    with pytest.raises(InvalidParameterError, match="'shrinkage' parameter .* Got 2.0"):
        GaussianLogisticRegression(shrinkage=2.0).fit(X, y)
    with pytest.raises(InvalidParameterError, match="'whiten' parameter"):
        GaussianLogisticRegression(whiten="yes").fit(X, y)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        GaussianLogisticRegression().fit(X, np.linspace(0, 1, len(X)))
    with pytest.raises(InputError, match="priors"):
        GaussianLogisticRegression(priors=[1.0, 0.0]).fit(X, y)
    with pytest.raises(InputError, match="priors has 3 entries but y has 2 classes"):
        GaussianLogisticRegression(priors=[0.2, 0.3, 0.5]).fit(X, y)
    m = GaussianLogisticRegression().fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features, but GaussianLogisticRegression is expecting 6"):
        m.predict(X[:, :5])
    with pytest.raises(ValueError, match="X has 5 features"):
        m.predict_proba(X[:, :5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="renormalising"):
            GaussianLogisticRegression(priors=[1.0, 1.0]).fit(X, y)


@pytest.mark.parametrize("shrinkage", [0.3, "auto"])
def test_whitened_shrinkage_is_lda_on_whitened_data(shrinkage):
    """whiten=True + shrinkage: sklearn's LDA fitted on BERT-whitened data z = (x − μ)U s^-½."""
    X, y = blobs(k=3, seed=8)
    Xt, _ = blobs(n=50, k=3, seed=9)
    s, U = np.linalg.eigh(np.cov(X, rowvar=False, bias=True))
    kernel = U / np.sqrt(s)
    center = X.mean(0)
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit((X - center) @ kernel, y)
    ours = GaussianLogisticRegression(whiten=True, shrinkage=shrinkage).fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(Xt), ref.predict_proba((Xt - center) @ kernel), atol=1e-8)
