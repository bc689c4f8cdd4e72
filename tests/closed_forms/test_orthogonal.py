import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from rosim.closed_forms import (
    OrthogonalMap,
    involution_between,
    orthogonal_map,
    reflection_between,
    rotation_between,
)
from rosim.errors import InputError

MAPS = [rotation_between, reflection_between, involution_between]
DIMS = [2, 3, 5, 64, 1024]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pairs(d, rng):
    """(name, a, b): random, nearly equal (1e-9 apart), nearly opposite, exactly equal, exactly opposite."""
    a = unit(rng.normal(size=d))
    yield "random", a, unit(rng.normal(size=d))
    yield "near", a, unit(a + 1e-9 * unit(rng.normal(size=d)))
    yield "opposite", a, unit(-a + 1e-9 * unit(rng.normal(size=d)))
    yield "equal", a, a.copy()
    yield "antiparallel", a, -a
    e = np.zeros(d)
    e[0] = 1.0
    yield "axis", e, -e


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("make", MAPS)
def test_orthogonal_and_maps_a_to_b(d, make):
    rng = np.random.default_rng(d)
    for name, a, b in pairs(d, rng):
        if d > 64 and name not in ("random", "near", "opposite"):
            continue  # (each TᵀT costs 2 GFlop at d = 1024)
        t = make(a, b)
        m = t.matrix()
        assert m.shape == (d, d)
        assert np.linalg.norm(m.T @ m - np.eye(d)) <= 1e-12, name  # Frobenius norm
        assert np.linalg.norm(m @ a - b) <= 1e-12, name
        assert np.linalg.norm(t.apply(a) - b) <= 1e-12, name
        x = rng.normal(size=(3, d))
        np.testing.assert_allclose(t.apply(x), x @ m.T, atol=1e-12)
        if d <= 64:
            det = np.linalg.det(m)
            want = {"rotation": 1.0, "reflection": -1.0, "involution": (-1.0) ** (d - 1)}[t.kind]
            assert abs(det - want) < 1e-9 and t.det() == want, name
        if t.kind != "rotation":  # symmetric: also T b = a, and T² = I
            assert np.linalg.norm(m - m.T) <= 1e-12, name
            assert np.linalg.norm(m @ b - a) <= 1e-12, name


def test_rotation_acts_only_in_the_a_b_plane():
    rng = np.random.default_rng(1)
    d = 7
    a, b = unit(rng.normal(size=d)), unit(rng.normal(size=d))
    q, _ = np.linalg.qr(np.stack([a, b], 1))
    x = rng.normal(size=d)
    x -= q @ (q.T @ x)
    t = rotation_between(a, b)
    np.testing.assert_allclose(t.apply(x), x, atol=1e-14)
    # the post's closed forms, away from their singular points
    c = a @ b
    eye = np.eye(d)
    post_rot = eye + 2 * np.outer(b, a) - np.outer(a + b, a + b) / (1 + c)
    post_ref = eye - np.outer(a - b, a - b) / (1 - c)
    post_inv = np.outer(a + b, a + b) / (1 + c) - eye
    np.testing.assert_allclose(t.matrix(), post_rot, atol=1e-13)
    np.testing.assert_allclose(reflection_between(a, b).matrix(), post_ref, atol=1e-13)
    np.testing.assert_allclose(involution_between(a, b).matrix(), post_inv, atol=1e-13)
    np.testing.assert_allclose(reflection_between(a, -b).matrix(), eye - np.outer(a + b, a + b) / (1 + c),
                               atol=1e-13)  # the c < 0 branch of the reflection


def test_rotation_equals_scipy_align_vectors_in_3d():
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, b = rng.normal(size=3), rng.normal(size=3)
        # SciPy's align_vectors(target, source) returns the rotation taking source to target
        ref = Rotation.align_vectors(unit(b)[None], unit(a)[None])[0].as_matrix()
        np.testing.assert_allclose(rotation_between(a, b).matrix(), ref, atol=1e-12)


def test_batched_broadcast_inverse_and_torch():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 1, 6))
    b = rng.normal(size=(5, 6))
    b[0] = -a[0, 0] * 3  # an exactly opposite pair inside the batch
    t = orthogonal_map(a, b, "rotation")
    assert t.batch_shape == (4, 5) and t.matrix().shape == (4, 5, 6, 6)
    np.testing.assert_allclose(t.apply(unit(a)), np.broadcast_to(unit(b), (4, 5, 6)), atol=1e-12)
    inv = t.inverse()
    np.testing.assert_allclose(inv.apply(unit(b)), np.broadcast_to(unit(a), (4, 5, 6)), atol=1e-12)
    np.testing.assert_allclose(inv.matrix(), np.swapaxes(t.matrix(), -1, -2), atol=1e-12)
    ta = torch.tensor(a[0, 0], requires_grad=True)
    tt = rotation_between(ta, torch.tensor(b[1]))
    assert isinstance(tt, OrthogonalMap) and isinstance(tt.matrix(), torch.Tensor)
    y = tt.apply(torch.ones(6, dtype=torch.float32))
    assert y.dtype == torch.float64
    y.sum().backward()
    assert torch.isfinite(ta.grad).all()
    assert orthogonal_map(a[0, 0], b[1], "symmetric").kind == "involution"


def test_one_dimension():
    assert rotation_between([2.0], [3.0]).matrix().tolist() == [[1.0]]
    assert reflection_between([2.0], [-3.0]).matrix().tolist() == [[-1.0]]
    assert involution_between([2.0], [-3.0]).matrix().tolist() == [[-1.0]]
    with pytest.raises(InputError, match="no rotation maps a to -a in 1 dimension"):
        rotation_between([1.0], [-1.0])
    with pytest.raises(InputError, match="no reflection in 1 dimension"):
        reflection_between([1.0], [2.0])


def test_bad_inputs():
    with pytest.raises(InputError, match="a contains a zero vector"):
        rotation_between(np.zeros(3), np.ones(3))
    with pytest.raises(InputError, match=r"b contains a zero vector at batch index \(1,\)"):
        rotation_between(np.ones((2, 3)), np.array([[1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(InputError, match="same d"):
        rotation_between(np.ones(3), np.ones(4))
    with pytest.raises(InputError, match="NaN or infinite"):
        reflection_between(np.array([1.0, np.inf]), np.ones(2))
    with pytest.raises(InputError, match="do not broadcast"):
        rotation_between(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(InputError, match="kind must be"):
        orthogonal_map(np.ones(3), np.ones(3), "shear")
    with pytest.raises(InputError, match=r"x must have shape \(\.\.\., 3\)"):
        rotation_between(np.ones(3), np.arange(3.0)).apply(np.ones(4))
