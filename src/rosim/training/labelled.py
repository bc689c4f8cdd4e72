"""Labelled pairs for supervised training: readers of pair files and NLI files, and the mixer.

* pairs: ``text_a<TAB>text_b<TAB>label`` (the files of ``../shared/data``): labels 0/1, or scores
  with a ``threshold`` (``label = score > threshold``; STS-B: 2.5);
* NLI: JSON lines ``{"sentence1", "sentence2", "gold_label"}`` with ``gold_label`` one of
  entailment / neutral / contradiction (case-insensitive). ``"-"`` (SNLI: no annotator consensus)
  is skipped and counted (``skip_no_consensus = false`` makes it an error); anything else is an
  error naming the file and line.

Class ids (one head scores all five, see :mod:`rosim.training.pair_head`): 0/1 binary, 2
contradiction, 3 entailment, 4 neutral. :class:`PairMixer` alternates the tasks 1 : 1.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rosim.errors import DataError, InputError
from rosim.textio import iter_lines
from rosim.training.config import SupervisedSection, parse_json_object

log = logging.getLogger(__name__)

NLI_LABELS = {"contradiction": 2, "entailment": 3, "neutral": 4}
TASKS = ("binary", "nli")
TASK_CLASSES = {"binary": (0, 1), "nli": (2, 3, 4)}


@dataclass
class LabelledPairs:
    """Pairs of one task: ``texts_a[i]``, ``texts_b[i]`` with class id ``labels[i]`` (see the table)."""

    task: str  # "binary" or "nli"
    texts_a: list[str]
    texts_b: list[str]
    labels: np.ndarray  # int64 class ids 0..4
    path: str = ""
    skipped: int = 0  # NLI records with gold_label "-" that were skipped

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"task must be 'binary' or 'nli', got {self.task!r}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (len(self.texts_a) == len(self.texts_b) == len(self.labels)):
            raise InputError(f"{len(self.texts_a)} texts_a, {len(self.texts_b)} texts_b, {len(self.labels)} labels")
        allowed = TASK_CLASSES[self.task]
        if len(self.labels) and not np.isin(self.labels, allowed).all():
            bad = int(self.labels[~np.isin(self.labels, allowed)][0])
            raise InputError(f"{self.task} pairs take classes {allowed}, got {bad}")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def concat(cls, parts: Sequence[LabelledPairs]) -> LabelledPairs:
        if not parts:
            raise InputError("nothing to concatenate")
        tasks = {p.task for p in parts}
        if len(tasks) != 1:
            raise InputError(f"cannot pool pairs of different tasks {sorted(tasks)}")
        return cls(parts[0].task, [t for p in parts for t in p.texts_a], [t for p in parts for t in p.texts_b],
                   np.concatenate([p.labels for p in parts]), ", ".join(p.path for p in parts),
                   sum(p.skipped for p in parts))


def read_pair_file(path: str | os.PathLike, threshold: float | None = None) -> LabelledPairs:
    """Read ``text_a<TAB>text_b<TAB>label`` lines as binary pairs.

    Without ``threshold`` every label must be 0 or 1. With it, labels are scores and become
    ``score > threshold`` (STS-B: 2.5). Malformed lines, labels outside the set and empty files are
    errors that name the file (and line).
    """
    from rosim.evaluation.sts import read_sts

    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                  or not math.isfinite(threshold)):
        raise InputError(f"threshold must be a finite number, got {threshold!r}")
    data = read_sts(path)  # format errors name file:line; an empty file is an InputError
    scores = data.labels
    if threshold is None:
        bad = ~np.isin(scores, (0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}:{data.line_numbers[i]}: label {scores[i]:g} is not 0 or 1; for scored data "
                "(e.g. STS-B 0-5) give a threshold (label = score > threshold)"
            )
        labels = scores.astype(np.int64)
    else:
        labels = (scores > threshold).astype(np.int64)
    if len(np.unique(labels)) < 2:
        log.warning("%s: every pair has label %d%s", path, int(labels[0]),
                    "" if threshold is None else f" at threshold {threshold}")
    return LabelledPairs("binary", data.texts_a, data.texts_b, labels, str(path))


def read_nli_file(path: str | os.PathLike, *, skip_no_consensus: bool = True) -> LabelledPairs:
    """Read NLI JSON lines ``{"sentence1", "sentence2", "gold_label"}``.

    ``gold_label`` is entailment, neutral or contradiction (case and surrounding spaces ignored).
    ``"-"`` marks pairs without annotator consensus: skipped (and counted in ``skipped``) unless
    ``skip_no_consensus`` is False. Any other label, a missing or empty sentence, a line that is not
    a JSON object, or a file without usable records raises an error naming the file and line.
    """
    a, b, labels, skipped = [], [], [], 0
    for number, line in iter_lines(path):
        where = f"{path}:{number}"
        obj = parse_json_object(line, where, DataError,
                                not_object="expected a JSON object with sentence1, sentence2, gold_label")
        for key in ("sentence1", "sentence2", "gold_label"):
            if key not in obj:
                raise DataError(f"{where}: missing key {key!r} (an NLI record has sentence1, sentence2, gold_label)")
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
        raw = obj["gold_label"]
        label = raw.strip().lower()
        if label == "-":
            if not skip_no_consensus:
                raise DataError(f"{where}: gold_label '-' (no annotator consensus); set skip_no_consensus = true to skip such pairs")
            skipped += 1
            continue
        if label not in NLI_LABELS:
            guess = difflib.get_close_matches(label, list(NLI_LABELS), n=1, cutoff=0.6)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise DataError(f"{where}: gold_label {raw!r} is not one of entailment, neutral, contradiction{hint}")
        s1, s2 = obj["sentence1"], obj["sentence2"]
        if not s1.strip() or not s2.strip():
            raise DataError(f"{where}: {'sentence1' if not s1.strip() else 'sentence2'} is empty")
        a.append(s1)
        b.append(s2)
        labels.append(NLI_LABELS[label])
    if not labels:
        why = f" ({skipped} records had gold_label '-')" if skipped else ""
        raise InputError(f"{path} contains no usable NLI pairs{why}")
    if skipped:
        log.info("%s: skipped %d pairs with gold_label '-'", path, skipped)
    return LabelledPairs("nli", a, b, np.asarray(labels, np.int64), str(path), skipped)


def load_labelled_data(section: SupervisedSection) -> tuple[LabelledPairs | None, LabelledPairs | None]:
    """Read every file of ``[supervised]``: (binary pairs pooled, NLI pairs pooled), None where absent."""
    binary = [read_pair_file(f.path, f.threshold) for f in section.binary]
    nli = [read_nli_file(f.path, skip_no_consensus=section.skip_no_consensus) for f in section.nli]
    return (LabelledPairs.concat(binary) if binary else None, LabelledPairs.concat(nli) if nli else None)


class PairMixer:
    """An endless, resumable stream of labelled pairs; binary and NLI pairs alternate (1 : 1).

    Each task's pairs (all its files pooled) are visited in a fresh random order every epoch; the
    order of epoch ``e`` of task ``k`` is ``default_rng([seed, k, e]).permutation(n)``, so the
    position is three small numbers per task (``state_dict``).
    """

    def __init__(self, binary: LabelledPairs | None, nli: LabelledPairs | None, *, seed: int = 0):
        self.sets = [s for s in (binary, nli) if s is not None and len(s)]
        if not self.sets:
            raise InputError("no labelled pairs: give [supervised] binary and/or nli files")
        self.seed = seed
        self.state = [{"epoch": 0, "pos": 0} for _ in self.sets]
        self.turn = 0
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # task -> (epoch, its order)

    def _order(self, k: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(k)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, k, epoch]).permutation(len(self.sets[k])))
            self._orders[k] = cached
        return cached[1]

    def next_pair(self) -> tuple[str, str, int, int]:
        k = self.turn % len(self.sets)
        self.turn += 1
        st, data = self.state[k], self.sets[k]
        i = int(self._order(k, st["epoch"])[st["pos"]])
        st["pos"] += 1
        if st["pos"] == len(data):
            st["epoch"], st["pos"] = st["epoch"] + 1, 0
        return data.texts_a[i], data.texts_b[i], int(data.labels[i]), TASKS.index(data.task)

    def next_pairs(self, n: int) -> list[tuple[str, str, int, int]]:
        return [self.next_pair() for _ in range(n)]

    def state_dict(self) -> dict:
        return {"tasks": [s.task for s in self.sets], "sizes": [len(s) for s in self.sets],
                "state": [dict(s) for s in self.state], "turn": self.turn}

    def load_state_dict(self, d: dict) -> None:
        mine = {"tasks": [s.task for s in self.sets], "sizes": [len(s) for s in self.sets]}
        if d.get("tasks") != mine["tasks"] or d.get("sizes") != mine["sizes"]:
            raise InputError(f"the data position was saved for {d.get('tasks')} sets of sizes {d.get('sizes')}, "
                             f"but this run has {mine['tasks']} of sizes {mine['sizes']}: the data changed")
        self.state = [{"epoch": int(s["epoch"]), "pos": int(s["pos"])} for s in d["state"]]
        self.turn = int(d["turn"])
