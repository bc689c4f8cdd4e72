"""Rank correlation, written out so that it can be checked against ``scipy.stats.spearmanr``."""

from __future__ import annotations

import numpy as np

from rosim.errors import InputError


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the average of the ranks they span (scipy's ``"average"``)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start index of each run of equal values
    new_run = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [len(x)]])  # exclusive
    average_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = average_rank[run_id]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (Pearson correlation of their average ranks).

    Returns NaN when either side is constant (the correlation is undefined), as scipy does.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise InputError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise InputError(f"spearman needs at least 2 pairs, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("spearman got NaN or infinite values")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt((rx @ rx) * (ry @ ry))
    if denom == 0:
        return float("nan")
    return float(np.clip((rx @ ry) / denom, -1.0, 1.0))
