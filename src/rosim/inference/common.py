"""Torch-free pieces shared by every encoder backend (PyTorch :class:`SimModel`, ONNX Runtime
:class:`~rosim.inference.onnx_backend.OnnxEncoder`): text checks, progress bars, poolings, similarity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from rosim.errors import InputError

Pooling = Literal["pooler", "cls", "mean", "first-last-mean"]
POOLINGS = ("pooler", "cls", "mean", "first-last-mean")


def progress(iterable, total: int, enabled: bool | None, desc: str):
    """tqdm over ``iterable``; ``enabled=None`` shows it only on a terminal and for more than one step."""
    import sys

    if enabled is None:
        enabled = sys.stderr.isatty() and total > 1
    if not enabled:
        return iterable  # tqdm.auto costs ~0.1 s to import (asyncio); a short-lived `rosim sim` skips it
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def check_texts(texts: str | Sequence[str]) -> tuple[list[str], bool]:
    """``(items, single)``: a non-empty list of strings, and whether one string was given."""
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    if not items:
        raise InputError("no texts given")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InputError(f"text {i} is a {type(t).__name__}, expected str")
    return items, single


def check_not_blank(texts: Sequence[str]) -> None:
    for i, t in enumerate(texts):
        if not t.strip():
            raise InputError(f"text {i} is empty or whitespace only")


def cosine_similarity(va: np.ndarray, vb: np.ndarray, *, a_single: bool, b_single: bool, pairwise: bool | None):
    """What ``similarity`` returns for normalised vectors: a float for two strings, pairwise cosines for
    two equal-length lists (``pairwise`` None or True), else the matrix."""
    if a_single and b_single:
        return float(va[0] @ vb[0])
    if pairwise is None:
        pairwise = len(va) == len(vb)
    if pairwise:
        if len(va) != len(vb):
            raise InputError(f"pairwise similarity needs equal lengths, got {len(va)} and {len(vb)}")
        return np.einsum("ij,ij->i", va, vb)
    return va @ vb.T
