import numpy as np
import ot
import pytest
import scipy.linalg as sla
import torch
from scipy import integrate, stats

from rosim.closed_forms import Gaussian, bhattacharyya, fit_gaussian, hellinger, kl, w2
from rosim.closed_forms import gaussian_distances as gd
from rosim.errors import InputError

FUNCS = [kl, bhattacharyya, hellinger, w2]


def rand_pd(rng, d, batch=()):
    A = rng.normal(size=(*batch, d, 2 * d))
    return A @ np.swapaxes(A, -1, -2) / (2 * d) + 0.05 * np.eye(d)


def rand_gaussians(rng, d, batch=()):
    return rng.normal(size=(*batch, d)), rand_pd(rng, d, batch)


# ---------------------------------------------------------------- references (direct SciPy)


def kl_ref(mp, cp, mq, cq):
    d = len(mp)
    delta = mp - mq
    return 0.5 * (delta @ sla.solve(cq, delta) + np.trace(sla.solve(cq, cp)) - d
                  - np.linalg.slogdet(cp)[1] + np.linalg.slogdet(cq)[1])


def bd_ref(mp, cp, mq, cq):
    cb = (cp + cq) / 2
    delta = mp - mq
    return 0.125 * delta @ sla.solve(cb, delta) + 0.5 * (
        np.linalg.slogdet(cb)[1] - 0.5 * np.linalg.slogdet(cp)[1] - 0.5 * np.linalg.slogdet(cq)[1])


def w2sq_bures_ref(mp, cp, mq, cq):
    s = sla.sqrtm(cp)
    return np.sum((mp - mq) ** 2) + np.trace(cp) + np.trace(cq) - 2 * np.trace(sla.sqrtm(s @ cq @ s)).real


def w2sq_frechet_ref(mp, cp, mq, cq):
    return np.sum((mp - mq) ** 2) + np.trace(cp) + np.trace(cq) - 2 * np.trace(sla.sqrtm(cp @ cq)).real


@pytest.mark.parametrize("d", [1, 2, 8, 32])
def test_equal_direct_scipy_within_1e8(d):
    rng = np.random.default_rng(d)
    for _ in range(3):
        mp, cp = rand_gaussians(rng, d)
        mq, cq = rand_gaussians(rng, d)
        bd = bd_ref(mp, cp, mq, cq)
        checks = [
            (kl(mp, cp, mq, cq), kl_ref(mp, cp, mq, cq)),
            (bhattacharyya(mp, cp, mq, cq), bd),
            (hellinger(mp, cp, mq, cq, squared=True), -np.expm1(-bd)),
            (hellinger(mp, cp, mq, cq), np.sqrt(-np.expm1(-bd))),
            (w2(mp, cp, mq, cq, squared=True), w2sq_bures_ref(mp, cp, mq, cq)),
            (w2(mp, cp, mq, cq, squared=True), w2sq_frechet_ref(mp, cp, mq, cq)),
            (w2(mp, cp, mq, cq), ot.gaussian.bures_wasserstein_distance(mp, mq, cp, cq)),
        ]
        for ours, ref in checks:
            assert isinstance(ours, float)
            np.testing.assert_allclose(ours, ref, rtol=1e-8)


def test_kl_equals_torch_distributions_batched():
    rng = np.random.default_rng(1)
    mp, cp = rand_gaussians(rng, 6, (5,))
    mq, cq = rand_gaussians(rng, 6, (5,))
    ref = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(torch.tensor(mp), torch.tensor(cp)),
        torch.distributions.MultivariateNormal(torch.tensor(mq), torch.tensor(cq))).numpy()
    np.testing.assert_allclose(kl(mp, cp, mq, cq), ref, rtol=1e-10)
    vp, vq = rng.uniform(0.1, 2, (5, 6)), rng.uniform(0.1, 2, (5, 6))
    ref_diag = torch.distributions.kl_divergence(
        torch.distributions.Independent(torch.distributions.Normal(torch.tensor(mp), torch.tensor(vp).sqrt()), 1),
        torch.distributions.Independent(torch.distributions.Normal(torch.tensor(mq), torch.tensor(vq).sqrt()), 1))
    np.testing.assert_allclose(kl(mp, vp, mq, vq, diagonal=True), ref_diag.numpy(), rtol=1e-10)


def test_kl_and_bhattacharyya_equal_monte_carlo():
    rng = np.random.default_rng(2)
    mp, cp = rand_gaussians(rng, 3)
    mq, cq = rand_gaussians(rng, 3)
    p, q = stats.multivariate_normal(mp, cp), stats.multivariate_normal(mq, cq)
    x = p.rvs(size=200_000, random_state=3)
    log_ratio = p.logpdf(x) - q.logpdf(x)
    assert abs(kl(mp, cp, mq, cq) - log_ratio.mean()) < 5 * log_ratio.std() / np.sqrt(len(x))
    ratio = np.exp(-0.5 * log_ratio)  # E_p[√(q/p)] = ∫√(pq)
    bc = ratio.mean()
    assert abs(np.exp(-bhattacharyya(mp, cp, mq, cq)) - bc) < 5 * ratio.std() / np.sqrt(len(x))


def test_hellinger_definition_by_quadrature_1d():
    p, q = stats.norm(0.3, 1.2), stats.norm(-0.5, 0.7)
    h2 = 0.5 * integrate.quad(lambda t: (np.sqrt(p.pdf(t)) - np.sqrt(q.pdf(t))) ** 2, -30, 30)[0]
    np.testing.assert_allclose(hellinger([0.3], [[1.44]], [-0.5], [[0.49]], squared=True), h2, rtol=1e-8)


def test_w2_pairwise_equals_pot_and_loop():
    rng = np.random.default_rng(4)
    mp, cp = rand_gaussians(rng, 5, (7,))
    mq, cq = rand_gaussians(rng, 5, (4,))
    ours = w2(mp, cp, mq, cq, pairwise=True)
    assert ours.shape == (7, 4)
    np.testing.assert_allclose(ours, ot.gaussian.bures_wasserstein_distance(mp, mq, cp, cq), rtol=1e-8)
    np.testing.assert_allclose(ot.gmm.dist_bures_squared(mp, mq, cp, cq), w2(mp, cp, mq, cq, pairwise=True, squared=True),
                               rtol=1e-8)
    for f in FUNCS:
        full = f(mp, cp, mq, cq, pairwise=True)
        loop = np.array([[f(mp[i], cp[i], mq[j], cq[j]) for j in range(4)] for i in range(7)])
        np.testing.assert_allclose(full, loop, rtol=1e-12, atol=1e-14)
        bcast = f(mp[:, None], cp[:, None], mq[None], cq[None])
        np.testing.assert_allclose(full, bcast, rtol=1e-12, atol=1e-14)


def test_pairwise_chunking_and_batch_shapes(monkeypatch):
    rng = np.random.default_rng(5)
    mp, cp = rand_gaussians(rng, 3, (2, 3))
    mq, cq = rand_gaussians(rng, 3, (4,))
    whole = {f: f(mp, cp, mq, cq, pairwise=True) for f in FUNCS}
    monkeypatch.setattr(gd, "_PAIR_BUDGET", 1)  # one row of p at a time
    for f in FUNCS:
        out = f(mp, cp, mq, cq, pairwise=True)
        assert out.shape == (2, 3, 4)
        np.testing.assert_allclose(out, whole[f], rtol=1e-13, atol=1e-15)
    # broadcasting: one q against a batch of p; a shared covariance with batched means
    assert kl(mp, cp, mq[0], cq[0]).shape == (2, 3)
    assert w2(mp, cp[0, 0], mq[0], cq[0]).shape == (2, 3)


@pytest.mark.parametrize("f", FUNCS)
def test_diagonal_fast_path_equals_full(f):
    rng = np.random.default_rng(6)
    mp, mq = rng.normal(size=(3, 4)), rng.normal(size=(2, 1, 4))
    vp, vq = rng.uniform(0.1, 3, (3, 4)), rng.uniform(0.1, 3, (2, 1, 4))
    diag = f(mp, vp, mq, vq, diagonal=True)
    full = f(mp, np.eye(4) * vp[..., None], mq, np.eye(4) * vq[..., None])
    assert diag.shape == (2, 3)
    np.testing.assert_allclose(diag, full, rtol=1e-10)
    np.testing.assert_allclose(f(mp, vp, mq[:, 0], vq[:, 0], diagonal=True, pairwise=True),
                               np.swapaxes(diag, 0, 1), rtol=1e-12)


def test_rank_deficient_inputs_give_finite_values():
    rng = np.random.default_rng(7)
    d = 6
    A = rng.normal(size=(d, 2))
    low = A @ A.T  # rank 2
    B = rng.normal(size=(d, 3))
    low2 = B @ B.T
    m = rng.normal(size=d)
    for f in FUNCS:
        for cp, cq in ((low, low2), (low, rand_pd(rng, d)), (low, low), (np.zeros((d, d)), low)):
            assert np.isfinite(f(m, cp, m + 1, cq))
        assert f(m, low, m, low) < 1e-6  # W₂ = √(rounding) ~ 1e-8
        assert f(m, low, m, low, **({"squared": True} if f in (w2, hellinger) else {})) < 1e-13
        assert np.isfinite(f(m, np.zeros(d), m + 1, np.ones(d), diagonal=True))
    # W2 needs no jitter: exact for PSD
    # exact reference from the factors: Tr (Σ_p^½ Σ_q Σ_p^½)^½ = ‖BᵀA‖_* for Σ_p = AAᵀ, Σ_q = BBᵀ
    ref = np.trace(low) + np.trace(low2) - 2 * np.linalg.svd(B.T @ A, compute_uv=False).sum() + d
    np.testing.assert_allclose(w2(m, low, m + 1, low2, squared=True), ref, rtol=1e-12)
    assert hellinger(m, low, m + 10, low2) <= 1.0


@pytest.mark.parametrize("cov", ["random", "identity", "rank2"])
def test_gradients_finite_at_p_equal_q(cov):
    rng = np.random.default_rng(8)
    d = 4
    c = {"random": rand_pd(rng, d), "identity": np.eye(d),
         "rank2": (lambda a: a @ a.T)(rng.normal(size=(d, 2)))}[cov]
    for f, kw in [(kl, {}), (bhattacharyya, {}), (hellinger, {}), (hellinger, {"squared": True}),
                  (w2, {}), (w2, {"squared": True})]:
        for diagonal in (False, True):
            cc = np.diag(c).copy() if diagonal else c
            mp = torch.tensor(rng.normal(size=d), requires_grad=True)
            mq = mp.detach().clone().requires_grad_(True)
            cp = torch.tensor(cc, requires_grad=True)
            cq = torch.tensor(cc, requires_grad=True)
            val = f(mp, cp, mq, cq, diagonal=diagonal, **kw)
            val.backward()
            assert abs(val.item()) < 1e-7, (f.__name__, kw, diagonal, val.item())
            for t in (mp, mq, cp, cq):
                assert torch.isfinite(t.grad).all(), (f.__name__, kw, diagonal)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(9)
    d = 2
    mp, cp = (torch.tensor(x, requires_grad=True) for x in rand_gaussians(rng, d))
    mq, cq = (torch.tensor(x, requires_grad=True) for x in rand_gaussians(rng, d))

    def sym(a):
        return (a + a.T) / 2

    def all_four(a, b, c, e):
        b, e = sym(b), sym(e)
        return torch.stack([kl(a, b, c, e), bhattacharyya(a, b, c, e), w2(a, b, c, e, squared=True),
                            hellinger(a, b, c, e, squared=True)])

    assert torch.autograd.gradcheck(all_four, (mp, cp, mq, cq))
    # at a repeated eigenvalue (Σ_p = I), where autograd through eigh would give NaN
    eye = torch.eye(d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, e: w2(mp, sym(b), mq, sym(e), squared=True), (eye, cq))


def test_types_dtypes_and_devices():
    rng = np.random.default_rng(10)
    mp, cp = rand_gaussians(rng, 3)
    mq, cq = rand_gaussians(rng, 3)
    out = w2(torch.tensor(mp, dtype=torch.float32), torch.tensor(cp, dtype=torch.float32), mq, cq)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert isinstance(kl(mp.tolist(), cp.tolist(), mq, cq), float)
    g = fit_gaussian(rng.normal(size=(50, 3)))
    assert isinstance(g, Gaussian) and isinstance(g.cov, np.ndarray)
    assert kl(*g, *g) == 0.0


def test_fit_gaussian():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    g = fit_gaussian(x)
    np.testing.assert_allclose(g.mean, x.mean(0))
    np.testing.assert_allclose(g.cov, np.cov(x, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(fit_gaussian(x, ddof=0).cov, np.cov(x, rowvar=False, bias=True), rtol=1e-12)
    np.testing.assert_allclose(fit_gaussian(x, diagonal=True).cov, x.var(0, ddof=1), rtol=1e-12)
    from sklearn.covariance import ledoit_wolf, shrunk_covariance

    np.testing.assert_allclose(fit_gaussian(x, ddof=0, shrinkage=0.3).cov,
                               shrunk_covariance(np.cov(x, rowvar=False, bias=True), 0.3), rtol=1e-12)
    np.testing.assert_allclose(fit_gaussian(x, ddof=0, shrinkage="auto").cov, ledoit_wolf(x)[0], rtol=1e-10)
    batched = fit_gaussian(torch.tensor(np.stack([x, 2 * x])))
    np.testing.assert_allclose(batched.cov[1].numpy(), 4 * g.cov, rtol=1e-12)
    with pytest.raises(InputError, match="more than 1 samples"):
        fit_gaussian(x[:1])
    with pytest.raises(InputError, match="shrinkage"):
        fit_gaussian(x, shrinkage="big")


def test_bad_inputs():
    rng = np.random.default_rng(12)
    mp, cp = rand_gaussians(rng, 3)
    mq, cq = rand_gaussians(rng, 4)
    with pytest.raises(InputError, match="different dimensions"):
        kl(mp, cp, mq, cq)
    with pytest.raises(InputError, match=r"cov_p must have shape \(\.\.\., 3, 3\)"):
        w2(mp, cq, mp, cp)
    bad = cp.copy()
    bad[0, 1] += 0.5
    for f in FUNCS:
        with pytest.raises(InputError, match="cov_q is not symmetric"):
            f(mp, cp, mp, bad)
    nan = mp.copy()
    nan[1] = np.nan
    with pytest.raises(InputError, match="mean_p contains NaN or infinite"):
        bhattacharyya(nan, cp, mp, cp)
    with pytest.raises(InputError, match="not positive semi-definite"):
        w2(mp, -cp, mp, cp)
    with pytest.raises(InputError, match="not positive semi-definite"):
        kl(mp, cp, mp, -cp)
    with pytest.raises(InputError, match="negative variances"):
        kl(mp, -np.ones(3), mp, np.ones(3), diagonal=True)
    with pytest.raises(InputError, match="do not broadcast"):
        w2(rng.normal(size=(2, 3)), rand_pd(rng, 3, (5,)), mp, cp)
    with pytest.raises(InputError, match="reg"):
        w2(mp, cp, mp, cp, reg=-1)
