"""Orthogonal maps T with T a = b between unit vectors (kexue.fm/archives/8453).

Three maps, each acting as described in the plane of a and b (c = aᵀb):

* ``rotation_between``:   the rotation by the angle between a and b inside their plane, identity on
  its orthogonal complement; det +1. The post's T = I + 2baᵀ − (a+b)(a+b)ᵀ/(1+c). In 3-D it is
  SciPy's ``Rotation.align_vectors(b, a)`` (SciPy's argument order is *target, source*).
* ``reflection_between``: the Householder reflection T = I − 2vvᵀ/vᵀv, v = a − b; det −1,
  symmetric, T b = a too.
* ``involution_between``: the post's "simplest" T = (a+b)(a+b)ᵀ/(1+c) − I = 2uuᵀ − I; symmetric,
  T² = I, det (−1)^(d−1) (a rotation by π about a + b in 3-D).

Each returns an `OrthogonalMap`, stored as a sign and at most three Householder vectors,
T = sign · H(v₁)H(v₂)H(v₃) with H(v) = I − 2vvᵀ: ``apply(x)`` costs O(d) per vector and never forms
the d × d matrix; ``matrix()`` forms it when asked.

Why products of reflections (the robustness choices): the closed forms divide by 1 + c (fails as
b → −a) or by ‖a − b‖ (as b → a), and even the Householder form I − 2vvᵀ/vᵀv, v = a − b, maps a
to b only up to |‖a‖² − ‖b‖²| / ‖a − b‖, i.e. ~1e-7 when a and b are 1e-9 apart, because two
rounded unit vectors never have exactly equal norms. So every map is built from reflections whose
vectors are well conditioned, switching by the sign of c (LAPACK ``larfg`` makes the same choice):

* rotation:     c ≥ 0: H(u)H(a),  u = (a+b)/‖a+b‖;   c < 0: H(w)H(v),  v = (a−b)/‖a−b‖, w ⟂ b in
  the plane. Both equal the plane rotation exactly (in exact arithmetic).
* reflection:   c ≤ 0: H(v);   c > 0: H(u)H(a)H(m), m ⟂ a in the plane — the rotation a → b after
  the reflection of the plane that fixes a, which is the same Householder matrix.
* involution:   c ≥ 0: −H(u);   c < 0: −H(v)H(a)H(m).

When b = ±a exactly the plane is undefined and any unit vector ⟂ a completes it; we take the
coordinate axis least aligned with a, orthogonalised (so a = b gives T = I for the rotation, a
reflection that fixes a for ``reflection_between``, and a = −b gives a rotation by π). Near b = ±a
the plane itself is ill-conditioned (it moves by ~1e-16/sin θ); T stays orthogonal and T a = b to
rounding error. In 1-D no rotation maps a to −a and no reflection fixes a: those raise InputError.
Inputs are normalised first; computation is float64, batched over leading dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from rosim.closed_forms._arrays import ArrayLike, as_float64, back
from rosim.errors import InputError

__all__ = ["OrthogonalMap", "involution_between", "orthogonal_map", "reflection_between",
           "rotation_between"]

Kind = Literal["rotation", "reflection", "involution"]


@dataclass(frozen=True)
class OrthogonalMap:
    """T = sign · H(v₁) ⋯ H(v_k), H(v) = I − 2vvᵀ, with each v a unit vector or 0 (H(0) = I).

    Attributes
    ----------
    vectors
        float64 tensor ``(..., k, d)``; ``...`` is the batch shape of the map.
    sign
        +1.0 or −1.0.
    kind
        ``"rotation"``, ``"reflection"`` or ``"involution"``.
    """

    vectors: torch.Tensor
    sign: float
    kind: str
    numpy: bool = False  # built from NumPy inputs: return NumPy for NumPy inputs

    @property
    def dim(self) -> int:
        return self.vectors.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.vectors.shape[:-2]

    def apply(self, x: ArrayLike) -> Any:
        """T x for ``x`` of shape ``(..., d)`` (its batch broadcasts with the map's); O(k·d) each."""
        t, from_numpy = as_float64(x, "x")
        if t.ndim < 1 or t.shape[-1] != self.dim:
            raise InputError(f"x must have shape (..., {self.dim}), got {tuple(t.shape)}")
        try:
            torch.broadcast_shapes(t.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise InputError(f"x {tuple(t.shape)} does not broadcast with the map's batch shape "
                             f"{tuple(self.batch_shape)}") from None
        out = _apply(self.vectors, self.sign, t.to(self.vectors.device))
        return back(out, from_numpy and self.numpy)

    __call__ = apply

    def matrix(self) -> Any:
        """The dense matrix T, shape ``(..., d, d)``."""
        eye = torch.eye(self.dim, dtype=self.vectors.dtype, device=self.vectors.device)
        rows = _apply(self.vectors.unsqueeze(-3), self.sign, eye)  # row i is T e_i
        return back(rows.transpose(-1, -2), self.numpy)

    def inverse(self) -> OrthogonalMap:
        """T⁻¹ = Tᵀ (the reflections in reverse order)."""
        return OrthogonalMap(self.vectors.flip(-2), self.sign, self.kind, self.numpy)

    def det(self) -> Any:
        """det T (±1) for each map in the batch."""
        count = (self.vectors.abs().sum(-1) > 0).sum(-1)
        det = (self.sign ** self.dim) * (1.0 - 2.0 * (count % 2).to(torch.float64))
        return back(det, self.numpy)


def _apply(v: torch.Tensor, sign: float, x: torch.Tensor) -> torch.Tensor:
    for j in range(v.shape[-2] - 1, -1, -1):
        vj = v[..., j, :]
        x = x - 2.0 * vj * (vj * x).sum(-1, keepdim=True)
    return x if sign > 0 else -x


def rotation_between(a: ArrayLike, b: ArrayLike) -> OrthogonalMap:
    """The rotation in the a–b plane taking a to b (det +1); a, b ``(..., d)``, normalised first."""
    return orthogonal_map(a, b, "rotation")


def reflection_between(a: ArrayLike, b: ArrayLike) -> OrthogonalMap:
    """The Householder reflection swapping a and b (det −1, symmetric); a, b ``(..., d)``."""
    return orthogonal_map(a, b, "reflection")


def involution_between(a: ArrayLike, b: ArrayLike) -> OrthogonalMap:
    """The post's symmetric involution 2uuᵀ − I, u ∝ a + b (T a = b, T b = a, T² = I)."""
    return orthogonal_map(a, b, "involution")


def orthogonal_map(a: ArrayLike, b: ArrayLike, kind: Kind = "rotation") -> OrthogonalMap:
    """An orthogonal T with T a/‖a‖ = b/‖b‖; ``kind`` is rotation, reflection or involution.

    Parameters
    ----------
    a, b
        Non-zero vectors ``(..., d)`` (NumPy or torch); batch dimensions broadcast.
    kind
        ``"rotation"`` (det +1), ``"reflection"`` (Householder, det −1) or ``"involution"``
        (``"symmetric"`` is accepted too).

    Returns
    -------
    OrthogonalMap
    """
    if kind == "symmetric":
        kind = "involution"
    if kind not in ("rotation", "reflection", "involution"):
        raise InputError(f"kind must be 'rotation', 'reflection' or 'involution', got {kind!r}")
    ta, na = as_float64(a, "a")
    tb, nb = as_float64(b, "b")
    if ta.ndim < 1 or tb.ndim < 1 or ta.shape[-1] != tb.shape[-1] or ta.shape[-1] == 0:
        raise InputError(f"a and b must have shapes (..., d) with the same d ≥ 1, got {tuple(ta.shape)} "
                         f"and {tuple(tb.shape)}")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.device != b.device:
        raise InputError(f"a and b are on different devices ({a.device}, {b.device})")
    dev = a.device if isinstance(a, torch.Tensor) else b.device if isinstance(b, torch.Tensor) else None
    if dev is not None:
        ta, tb = ta.to(dev), tb.to(dev)
    try:
        shape = torch.broadcast_shapes(ta.shape, tb.shape)
    except RuntimeError:
        raise InputError(f"a {tuple(ta.shape)} and b {tuple(tb.shape)} do not broadcast") from None
    ta, tb = ta.expand(shape), tb.expand(shape)
    for name, t in (("a", ta), ("b", tb)):
        zero = torch.linalg.vector_norm(t.detach(), dim=-1) == 0
        if bool(zero.any()):
            where = tuple(zero.nonzero()[0].tolist())
            raise InputError(f"{name} contains a zero vector{' at batch index ' + str(where) if where else ''}"
                             "; a direction needs a non-zero vector")
    a_ = ta / torch.linalg.vector_norm(ta, dim=-1, keepdim=True)
    b_ = tb / torch.linalg.vector_norm(tb, dim=-1, keepdim=True)
    d = shape[-1]
    c = (a_ * b_).sum(-1, keepdim=True)
    zero = torch.zeros_like(a_)
    u = _unit(a_ + b_)
    v = _unit(a_ - b_)
    if kind == "rotation":
        if d == 1 and bool((c < 0).any()):
            raise InputError("no rotation maps a to -a in 1 dimension; use kind='reflection'")
        w = _perp(a_, b_)
        near = torch.stack([u, a_], -2)
        far = torch.stack([w, v], -2)
        sign = 1.0
        vectors = torch.where((c >= 0).unsqueeze(-1), near, far)
    elif kind == "reflection":
        if d == 1 and bool((c > 0).any()):
            raise InputError("no reflection in 1 dimension maps a to a; use kind='rotation'")
        m = _perp(b_, a_)
        near = torch.stack([u, a_, m], -2)
        far = torch.stack([v, zero, zero], -2)
        sign = 1.0
        vectors = torch.where((c > 0).unsqueeze(-1), near, far)
    else:
        m = _perp(b_, a_)
        near = torch.stack([u, zero, zero], -2)
        far = torch.stack([v, a_, m], -2)
        sign = -1.0
        vectors = torch.where((c >= 0).unsqueeze(-1), near, far)
    return OrthogonalMap(vectors, sign, kind, numpy=na and nb)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖, and 0 where x = 0 (no NaN, also in gradients)."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    ok = n > 1e-200
    return torch.where(ok, x / torch.where(ok, n, torch.ones_like(n)), torch.zeros_like(x))


def _perp(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Unit vector along the part of x orthogonal to unit ``ref`` (Gram–Schmidt twice).

    Where x ∥ ref exactly, the coordinate axis least aligned with ref is used instead; in 1-D,
    where nothing is orthogonal to ref, the result is 0.
    """
    r = _unit(_orth(_orth(x, ref), ref))
    missing = torch.linalg.vector_norm(r, dim=-1, keepdim=True) == 0
    if bool(missing.any()):
        k = ref.detach().abs().argmin(-1, keepdim=True)
        e = torch.zeros_like(ref).scatter_(-1, k, 1.0)
        r = torch.where(missing, _unit(_orth(_orth(e, ref), ref)), r)
    return r


def _orth(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x - (x * ref).sum(-1, keepdim=True) * ref
