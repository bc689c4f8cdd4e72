"""STS evaluation: Spearman x 100 between the cosine of two sentence vectors and the label.

The protocol of the RoFormer-Sim / SimBERT / BERT-whitening tables: encode each sentence on its own,
optionally whiten (mean and covariance of the sentences being evaluated, per file), compare by cosine,
and report Spearman's rank correlation with the gold labels, times 100.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rosim.errors import InputError
from rosim.evaluation.metrics import spearman
from rosim.evaluation.sts import StsPairs, read_sts
from rosim.evaluation.whitening import apply_whitening, fit_whitening, l2_normalize

POOLINGS = ("pooler", "cls", "mean", "first-last-mean")
WhitenSpec = str  # "none" | "full" | a positive integer as text


@dataclass
class StsResult:
    """One file evaluated with one pooling and one whitening setting."""

    file: str
    name: str
    pairs: int
    spearman: float  # x 100; NaN when undefined (constant labels or constant cosines)
    pooling: str | None
    whiten: str
    model: str
    cosines: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        rho = None if np.isnan(self.spearman) else round(float(self.spearman), 2)
        return {"file": self.file, "spearman": rho, "pairs": self.pairs, "pooling": self.pooling,
                "whiten": self.whiten, "model": self.model}


def parse_whiten(spec: str | int | None) -> str:
    """Canonical whitening setting: ``"none"``, ``"full"`` or a positive integer K as text."""
    if spec is None:
        return "none"
    text = str(spec).strip().lower()
    if text in ("none", "full"):
        return text
    try:
        k = int(text)
    except ValueError:
        raise InputError(f"whitening must be none, full or a positive integer K, got {spec!r}") from None
    if k <= 0:
        raise InputError(f"whitening dimension K must be positive, got {k}")
    return str(k)


def cosine_scores(vec_a: np.ndarray, vec_b: np.ndarray, whiten: str = "none") -> np.ndarray:
    """Pairwise cosines of raw vectors; with whitening fitted on all rows of ``vec_a`` and ``vec_b``."""
    whiten = parse_whiten(whiten)
    if vec_a.shape != vec_b.shape:
        raise InputError(f"vector shapes differ: {vec_a.shape} vs {vec_b.shape}")
    if whiten == "none":
        a, b = l2_normalize(np.asarray(vec_a, np.float64)), l2_normalize(np.asarray(vec_b, np.float64))
    else:
        k = None if whiten == "full" else int(whiten)
        if k is not None and k > vec_a.shape[1]:
            raise InputError(f"--whiten {k} exceeds the vector dimension {vec_a.shape[1]}")
        kernel, bias = fit_whitening(np.concatenate([vec_a, vec_b]), k)
        a, b = apply_whitening(vec_a, kernel, bias), apply_whitening(vec_b, kernel, bias)
    return np.einsum("ij,ij->i", a, b)


def encode_pairs(encoder, pairs: StsPairs, *, pooling: str | None = "pooler", batch_size: int = 64,
                 show_progress_bar: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw (unnormalised) vectors of both sides; every distinct sentence is encoded once."""
    unique = list(dict.fromkeys(pairs.texts_a + pairs.texts_b))
    where = {t: i for i, t in enumerate(unique)}
    kwargs = {"batch_size": batch_size, "normalize": False, "show_progress_bar": show_progress_bar}
    if pooling is not None:
        kwargs["pooling"] = pooling
    vecs = np.asarray(encoder.encode(unique, **kwargs), dtype=np.float32)
    ia = np.fromiter((where[t] for t in pairs.texts_a), dtype=np.int64, count=len(pairs))
    ib = np.fromiter((where[t] for t in pairs.texts_b), dtype=np.int64, count=len(pairs))
    return vecs[ia], vecs[ib]


def evaluate(encoder, files: Sequence[str | os.PathLike | StsPairs], *,
             poolings: Sequence[str | None] | None = None, whitens: Sequence[str] = ("none",),
             batch_size: int = 64, show_progress_bar: bool | None = None) -> list[StsResult]:
    """Evaluate ``encoder`` on every file, for every pooling and whitening setting.

    ``encoder`` is a :class:`~rosim.inference.sim_model.SimModel` (poolings ``pooler`` — the
    default —, ``cls``, ``mean``, ``first-last-mean``) or a teacher from
    :mod:`rosim.evaluation.teachers` (its own fixed pooling, written ``None``). All files are read
    and checked before anything is encoded, so a malformed line is reported at once. Results come
    file by file, then pooling, then whitening.
    """
    if not files:
        raise InputError("no files to evaluate")
    if poolings is None:
        poolings = getattr(encoder, "poolings", POOLINGS)[:1]
    whitens = [parse_whiten(w) for w in whitens]
    for p in poolings:
        if p is not None and p not in POOLINGS:
            raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {p!r}")
    dim = encoder.identity().get("dim") if hasattr(encoder, "identity") else None
    for w in whitens:
        if dim is not None and w not in ("none", "full") and int(w) > dim:
            raise InputError(f"--whiten {w} exceeds the vector dimension {dim}")
    datasets = [f if isinstance(f, StsPairs) else read_sts(f) for f in files]
    model_name = getattr(encoder, "name", type(encoder).__name__)
    results = []
    for data in datasets:
        if len(data) < 2:
            raise InputError(f"{data.path}: Spearman needs at least 2 pairs, got {len(data)}")
        for pooling in poolings:
            va, vb = encode_pairs(encoder, data, pooling=pooling, batch_size=batch_size,
                                  show_progress_bar=show_progress_bar)
            for whiten in whitens:
                cos = cosine_scores(va, vb, whiten)
                rho = spearman(cos, data.labels)
                results.append(StsResult(data.path, data.name, len(data), 100.0 * rho, pooling, whiten,
                                         model_name, cos, data.labels))
    return results
