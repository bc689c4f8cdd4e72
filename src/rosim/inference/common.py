"""Torch-free pieces shared by every encoder backend (PyTorch :class:`SimModel`, ONNX Runtime
:class:`~rosim.inference.onnx_backend.OnnxEncoder`): text checks, progress bars, poolings, similarity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from rosim.errors import InputError

Pooling = Literal["pooler", "cls", "mean", "first-last-mean"]
POOLINGS = ("pooler", "cls", "mean", "first-last-mean")


def _shown(total: int, enabled: bool | None) -> bool:
    """``enabled``, or for None: on a terminal and for more than one step."""
    import sys

    return bool(enabled) if enabled is not None else sys.stderr.isatty() and total > 1


def progress(iterable, total: int, enabled: bool | None, desc: str):
    """tqdm over ``iterable``; ``enabled=None`` shows it only on a terminal and for more than one step."""
    if not _shown(total, enabled):
        return iterable  # tqdm.auto costs ~0.1 s to import (asyncio); a short-lived `rosim sim` skips it
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


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
    """Every text has a visible character and is valid Unicode (:func:`rosim.limits.text_problem`)."""
    from rosim.limits import text_problem

    for i, t in enumerate(texts):
        problem = text_problem(t)
        if problem is not None:
            raise InputError(f"text {i} {problem}")


def progress_bar(total: int, enabled: bool | None, desc: str):
    """A bar to ``update(k)`` and ``close()``: tqdm on a terminal (``enabled=None``), else a no-op."""
    if not _shown(total, enabled):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def similarity(encode, a: str | Sequence[str], b: str | Sequence[str], *, batch_size: int = 64):
    """Cosine of every text of ``a`` with every text of ``b`` under ``encode`` (normalised vectors),
    shaped by :func:`scores_by_forms`. Texts shared by ``a`` and ``b`` are encoded once."""
    a_items, a_single = check_texts(a)
    b_items, b_single = check_texts(b)
    va, vb = _encode_both(encode, a_items, b_items, batch_size)
    return scores_by_forms(va, vb, a_single=a_single, b_single=b_single)


def scores_by_forms(va: np.ndarray, vb: np.ndarray, *, a_single: bool, b_single: bool):
    """Cosines of normalised ``va`` and ``vb`` shaped by the argument forms, never the lengths:
    ``(str, str)`` → float, ``(str, list)`` → ``(len(b),)``, ``(list, str)`` → ``(len(a),)``,
    ``(list, list)`` → the ``(len(a), len(b))`` matrix (the rule of ``similarity`` everywhere)."""
    scores = va @ vb.T
    if a_single and b_single:
        return float(scores[0, 0])
    if a_single or b_single:
        return scores[0] if a_single else scores[:, 0]
    return scores


def similarity_pairwise(encode, a: Sequence[str], b: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Cosine of ``a[i]`` with ``b[i]`` for two lists of equal length: a vector ``(len(a),)``."""
    if isinstance(a, str) or isinstance(b, str):
        raise InputError("similarity_pairwise takes two lists of texts; for two strings use similarity(a, b)")
    a_items, _ = check_texts(a)
    b_items, _ = check_texts(b)
    if len(a_items) != len(b_items):
        raise InputError(f"pairwise similarity needs two lists of equal length, got {len(a_items)} and {len(b_items)}")
    va, vb = _encode_both(encode, a_items, b_items, batch_size)
    return np.einsum("ij,ij->i", va, vb)


def unique_texts(a: list[str], b: list[str]) -> tuple[list[str], list[int], list[int]]:
    """The distinct texts of ``a + b`` (first-seen order) and the row of each text of ``a`` and ``b``."""
    unique = list(dict.fromkeys(a + b))
    row = {t: i for i, t in enumerate(unique)}
    return unique, [row[t] for t in a], [row[t] for t in b]


def _encode_both(encode, a: list[str], b: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    unique, rows_a, rows_b = unique_texts(a, b)
    vecs = encode(unique, batch_size=batch_size)
    return vecs[rows_a], vecs[rows_b]
