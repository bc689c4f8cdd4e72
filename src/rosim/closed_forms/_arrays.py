"""Input handling shared by the closed forms: NumPy or torch in, float64 torch inside, same kind out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rosim.errors import InputError

ArrayLike = Any  # np.ndarray | torch.Tensor | nested sequences of numbers


def as_float64(x: ArrayLike, name: str) -> tuple[torch.Tensor, bool]:
    """``x`` as a float64 tensor (differentiable if ``x`` is a tensor), and whether it came as NumPy.

    Raises InputError for non-numeric input and for NaN or infinite entries.
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex() or not (x.is_floating_point() or x.dtype in _INT_DTYPES):
            raise InputError(f"{name} must be a real tensor, got dtype {x.dtype}")
        t, from_numpy = x.to(torch.float64), False
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must be an array of numbers: {exc}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                       or np.issubdtype(arr.dtype, np.integer)
                                       or arr.dtype == np.bool_):
            raise InputError(f"{name} must be an array of real numbers, got dtype {arr.dtype}")
        t, from_numpy = torch.from_numpy(np.array(arr, dtype=np.float64, copy=True)), True
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return t, from_numpy


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


def back(t: torch.Tensor, to_numpy: bool) -> Any:
    """Return ``t`` as NumPy (a float for 0-d) when the inputs were NumPy, else as the tensor."""
    if not to_numpy:
        return t
    out = t.detach().cpu().numpy()
    return float(out) if out.ndim == 0 else out
