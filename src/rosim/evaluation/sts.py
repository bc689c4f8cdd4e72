"""Reading sentence-pair files: ``text_a<TAB>text_b<TAB>label``, one pair per line, no header."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rosim.errors import DataError, InputError
from rosim.textio import iter_lines


@dataclass
class StsPairs:
    """The pairs of one file: ``texts_a[i]`` and ``texts_b[i]`` labelled ``labels[i]``."""

    path: str
    texts_a: list[str]
    texts_b: list[str]
    labels: np.ndarray  # float64, shape (n,)
    line_numbers: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def name(self) -> str:
        """A short label: the last two path components (``STS-B/test.tsv``)."""
        parts = Path(self.path).parts
        return "/".join(parts[-2:]) if len(parts) >= 2 else self.path


def read_sts(path: str | os.PathLike) -> StsPairs:
    """Read a labelled pair file; malformed lines raise a :class:`DataError` naming ``file:line``.

    Each non-empty line must have exactly three tab-separated fields: two non-empty texts and a
    finite number (a 0/1 match label or a graded score). Empty lines are skipped; a file with no
    pairs is an error.
    """
    a, b, labels, numbers = [], [], [], []
    for number, line in iter_lines(path):
        fields = line.split("\t")
        where = f"{path}:{number}"
        if len(fields) != 3:
            raise DataError(
                f"{where}: expected 3 tab-separated fields (text_a, text_b, label), got {len(fields)}"
                + (" (is the file tab-separated?)" if len(fields) < 3 else "")
            )
        text_a, text_b, raw = fields
        if not text_a.strip() or not text_b.strip():
            raise DataError(f"{where}: {'text_a' if not text_a.strip() else 'text_b'} is empty")
        try:
            label = float(raw.strip())
        except ValueError:
            raise DataError(f"{where}: label {raw!r} is not a number") from None
        if not math.isfinite(label):
            raise DataError(f"{where}: label {raw!r} is not a finite number")
        a.append(text_a)
        b.append(text_b)
        labels.append(label)
        numbers.append(number)
    if not labels:
        raise InputError(f"{path} contains no sentence pairs (expected lines text_a<TAB>text_b<TAB>label)")
    return StsPairs(str(path), a, b, np.asarray(labels, dtype=np.float64), numbers)
