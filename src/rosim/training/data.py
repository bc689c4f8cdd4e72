"""Training data: streamed JSON-lines sources, ratio mixing, and UniLM batches (spec §B).

Input records, one JSON object per line:

* ``{"text": "...", "synonyms": ["...", ...]}`` — a group of similar sentences; each time the group
  comes up, two distinct members are drawn at random (the RoFormer-Sim question groups);
* ``{"text_a": "...", "text_b": "..."}`` — one similar pair (the general-sentence corpora).

Every text is cut like bert4keras ``text_segmentate(text, maxlen*1.2, seps='\\n。！？!?；;，, ')``
and only the first piece is kept. A pair ``(a, b)`` gives two adjacent rows,
``[CLS] a [SEP] b [SEP]`` and ``[CLS] b [SEP] a [SEP]`` (rows ``2k`` and ``2k+1`` are positives),
each truncated longest-first to ``maxlen*2`` tokens.

Reading is streamed: a source is read line by line from a byte offset, cycling forever, with an
optional shuffle buffer, so corpora larger than memory work. :class:`PairStream` mixes several
sources with given ratios (a smooth weighted round-robin: exact, deterministic proportions) and its
whole position — offsets, buffers, random state — is a JSON-serialisable ``state_dict``: a resumed
run reads exactly the pairs an uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from rosim.errors import DataError, InputError
from rosim.tokenization.tokenizer import CharTokenizer, Encoding
from rosim.training.config import parse_json_object
from rosim.training.noise import WholeWordMasking, noisy_source_ids

log = logging.getLogger(__name__)

DEFAULT_SEPS = "\n。！？!?；;，, "


# --------------------------------------------------------------------------------------------
# text cutting
# --------------------------------------------------------------------------------------------
def text_segmentate(text: str, maxlen: float, seps: str = DEFAULT_SEPS) -> list[str]:
    """Split ``text`` into pieces of at most ``maxlen`` characters where the separators allow.

    Separators are tried in order: the text is split on the first one, pieces are packed greedily
    (each keeps its separator) and a packed piece still longer than ``maxlen`` is split on the next
    separator. A piece without any separator stays whole (it may exceed ``maxlen``).
    """
    text = text.strip()
    if not seps or len(text) <= maxlen:
        return [text] if text else []
    sep, rest = seps[0], seps[1:]
    parts = text.split(sep)
    pieces: list[str] = []
    current = ""
    for i, part in enumerate(parts):
        if current and part and len(current) + len(part) > maxlen - 1:
            pieces.extend(text_segmentate(current, maxlen, rest))
            current = ""
        current += part if i + 1 == len(parts) else part + sep
    if current:
        pieces.extend(text_segmentate(current, maxlen, rest))
    return pieces


def cut_text(text: str, maxlen: int, seps: str = DEFAULT_SEPS) -> str:
    """The first piece of :func:`text_segmentate` at ``maxlen * 1.2`` (spec §B), or '' for blank text."""
    pieces = text_segmentate(text, maxlen * 1.2, seps)
    return pieces[0] if pieces else ""


# --------------------------------------------------------------------------------------------
# parsing records
# --------------------------------------------------------------------------------------------
def parse_record(line: str, where: str, *, single_ok: bool = False) -> list[str] | tuple[str, str]:
    """Parse one JSON line into a group (list of >= 2 texts) or a pair (tuple of 2 texts).

    With ``single_ok`` (the MLM stage) a lone ``{"text": ...}`` is a group of one.
    ``where`` ("file:line") is put in front of every error message.
    """
    obj = parse_json_object(line, where, DataError)
    if "text_a" in obj or "text_b" in obj:
        a, b = obj.get("text_a"), obj.get("text_b")
        for key, value in (("text_a", a), ("text_b", b)):
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{where}: {key!r} is empty")
        return (a, b)
    if "text" in obj:
        text, synonyms = obj["text"], obj.get("synonyms", [])
        if not isinstance(synonyms, list):
            raise DataError(f"{where}: 'synonyms' must be a list of strings, got {type(synonyms).__name__}")
        members = [text, *synonyms]
        for i, value in enumerate(members):
            name = "text" if i == 0 else f"synonyms[{i - 1}]"
            if not isinstance(value, str):
                raise DataError(f"{where}: {name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{where}: {name} is empty")
        if len(members) < 2 and not single_ok:
            raise DataError(f"{where}: a group needs at least two texts ('text' plus one or more 'synonyms')")
        return members
    raise DataError(
        f"{where}: a record needs either 'text_a' and 'text_b' (a pair) or 'text' and 'synonyms' "
        f"(a group); got keys {sorted(obj)}"
    )


# --------------------------------------------------------------------------------------------
# one streamed source
# --------------------------------------------------------------------------------------------
@dataclass
class Source:
    """A JSON-lines file and its share of the mix."""

    path: str
    ratio: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not self.ratio > 0:
            raise InputError(f"source {self.path}: ratio must be a positive number, got {self.ratio!r}")
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"data source not found: {self.path}")


@dataclass
class _SourceState:
    offset: int = 0  # byte offset of the next line to read
    line: int = 0  # number of lines read in the current pass
    epoch: int = 0  # completed passes
    good_in_epoch: int = 0  # usable records in the current pass
    skipped: int = 0  # malformed or empty records skipped (all passes)
    buffer: list[Any] = field(default_factory=list)  # shuffle buffer of parsed records


class _SourceReader:
    """Reads records of one file from a byte offset, cycling; optional shuffle buffer."""

    def __init__(self, source: Source, *, skip_bad: bool, buffer_size: int, rng: np.random.Generator,
                 single_ok: bool = False):
        self.source = source
        self.single_ok = single_ok
        self.skip_bad = skip_bad
        self.buffer_size = buffer_size
        self.rng = rng
        self.state = _SourceState()

    def _read_one(self) -> list[str] | tuple[str, str]:
        """Next usable record from the file, cycling at end of file."""
        st = self.state
        path = self.source.path
        with open(path, "rb") as fh:
            fh.seek(st.offset)
            while True:
                raw = fh.readline()
                if not raw:  # end of file: next pass
                    if st.good_in_epoch == 0:
                        raise DataError(f"{path}: no usable records (file is empty or every line was skipped)")
                    st.epoch += 1
                    st.offset = st.line = st.good_in_epoch = 0
                    fh.seek(0)
                    continue
                st.offset += len(raw)
                st.line += 1
                where = f"{path}:{st.line}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    err = DataError(f"{where}: not UTF-8 ({exc.reason})")
                    if not self.skip_bad:
                        raise err from None
                    self._skip(err)
                    continue
                if not text.strip():
                    continue  # blank lines are allowed
                try:
                    record = parse_record(text, where, single_ok=self.single_ok)
                except DataError as err:
                    if not self.skip_bad:
                        raise DataError(f"{err} (pass skip_bad_lines=true to skip such lines)") from None
                    self._skip(err)
                    continue
                st.good_in_epoch += 1
                return record

    def _skip(self, err: DataError) -> None:
        self.state.skipped += 1
        if self.state.epoch == 0:  # report each bad line once
            log.warning("skipping %s", err)

    def next_record(self) -> list[str] | tuple[str, str]:
        if self.buffer_size <= 1:
            return self._read_one()
        buf = self.state.buffer
        while len(buf) < self.buffer_size:
            buf.append(self._read_one())
        i = int(self.rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        return buf.pop()

    def snapshot(self) -> _SourceState:
        """A cheap copy of the position (the buffer list copied, its records shared)."""
        return dataclasses.replace(self.state, buffer=list(self.state.buffer))

    def state_dict(self, state: _SourceState | None = None) -> dict:
        st = self.state if state is None else state
        return {
            "offset": st.offset, "line": st.line, "epoch": st.epoch, "good_in_epoch": st.good_in_epoch,
            "skipped": st.skipped, "buffer": [list(r) if isinstance(r, tuple) else {"group": r} for r in st.buffer],
        }

    def load_state_dict(self, d: dict) -> None:
        buf = [tuple(r) if isinstance(r, list) else list(r["group"]) for r in d["buffer"]]
        self.state = _SourceState(d["offset"], d["line"], d["epoch"], d["good_in_epoch"], d["skipped"], buf)


# --------------------------------------------------------------------------------------------
# the mixed stream of pairs
# --------------------------------------------------------------------------------------------
class PairStream(IterableDataset):
    """An endless, resumable stream of similar pairs ``(a, b)`` mixed from several sources.

    Parameters
    ----------
    sources : files and their ratios (the spec's mix is questions : general = 1 : 1).
    maxlen : per-sentence length; texts are cut at ``maxlen * 1.2`` characters (first piece kept).
    seed : seeds the shuffle buffers and the choice of two members of a group.
    skip_bad_lines : skip malformed JSON or empty texts (logged with file and line) instead of failing.
    shuffle_buffer : records held per source and drawn at random (0 or 1: file order).
    single_texts : accept lone ``{"text": ...}`` records (for :meth:`next_texts`, the MLM stage).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        maxlen: int = 64,
        seed: int = 0,
        skip_bad_lines: bool = False,
        shuffle_buffer: int = 0,
        seps: str = DEFAULT_SEPS,
        single_texts: bool = False,
    ):
        if not sources:
            raise InputError("no data sources given")
        if maxlen < 2:
            raise InputError(f"maxlen must be at least 2, got {maxlen}")
        if shuffle_buffer < 0:
            raise InputError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.sources = list(sources)
        self.maxlen, self.seps, self.seed = maxlen, seps, seed
        self.rng = np.random.default_rng(seed)
        self.readers = [
            _SourceReader(s, skip_bad=skip_bad_lines, buffer_size=shuffle_buffer, rng=self.rng, single_ok=single_texts)
            for s in self.sources
        ]
        self.pending: list[str] = []  # texts drawn but not yet handed out by next_texts
        self.weights = [float(s.ratio) for s in self.sources]
        self.current = [0.0] * len(self.sources)
        self.pairs_read = 0

    def _pick_source(self) -> int:
        """Smooth weighted round-robin: over any window, source i comes up in proportion to its ratio."""
        total = sum(self.weights)
        for i, w in enumerate(self.weights):
            self.current[i] += w
        best = max(range(len(self.current)), key=lambda i: (self.current[i], -i))
        self.current[best] -= total
        return best

    def next_pair(self) -> tuple[str, str]:
        while True:
            k = self._pick_source()
            record = self.readers[k].next_record()
            if isinstance(record, list) and len(record) < 2:
                raise DataError(f"{self.sources[k].path}: a lone text cannot make a similar pair")
            if isinstance(record, tuple):
                a, b = record
            else:
                i, j = self.rng.choice(len(record), size=2, replace=False)
                a, b = record[int(i)], record[int(j)]
            a, b = cut_text(a, self.maxlen, self.seps), cut_text(b, self.maxlen, self.seps)
            if a and b:
                self.pairs_read += 1
                return a, b

    def next_texts(self, n: int) -> list[str]:
        """``n`` single (cut) sentences: every text of each record in turn, for the MLM stage."""
        while len(self.pending) < n:
            record = self.readers[self._pick_source()].next_record()
            cut = [cut_text(t, self.maxlen, self.seps) for t in record]
            self.pending.extend(t for t in cut if t)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def __iter__(self) -> Iterator[tuple[str, str]]:
        while True:
            yield self.next_pair()

    # ---------------------------------------------------------------- resumable position
    def snapshot(self) -> dict:
        """The position now, cheaply (no JSON conversion): :meth:`state_dict` turns it into the
        JSON-serialisable form later, e.g. only for the steps that are checkpointed."""
        return {"readers": [r.snapshot() for r in self.readers], "current": list(self.current),
                "rng": self.rng.bit_generator.state, "pairs_read": self.pairs_read, "pending": list(self.pending)}

    def state_dict(self, snapshot: dict | None = None) -> dict:
        snap = self.snapshot() if snapshot is None else snapshot
        return {
            "sources": [s.path for s in self.sources],
            "readers": [r.state_dict(st) for r, st in zip(self.readers, snap["readers"], strict=True)],
            "current": list(snap["current"]),
            "rng": snap["rng"],
            "pairs_read": snap["pairs_read"],
            "pending": list(snap["pending"]),
        }

    def load_state_dict(self, d: dict) -> None:
        paths = [s.path for s in self.sources]
        if d["sources"] != paths:
            raise InputError(f"the data position was saved for sources {d['sources']}, but the run uses {paths}")
        for reader, rd in zip(self.readers, d["readers"], strict=True):
            reader.load_state_dict(rd)
        self.current = [float(c) for c in d["current"]]
        self.rng.bit_generator.state = d["rng"]
        self.pairs_read = int(d["pairs_read"])
        self.pending = list(d.get("pending", []))

    def skipped(self) -> int:
        return sum(r.state.skipped for r in self.readers)


def iter_texts(path: str | os.PathLike, *, skip_bad_lines: bool = False) -> Iterator[str]:
    """Every text of every record of one JSON-lines file, once, in order (for vocabularies and teachers)."""
    path = str(path)
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = parse_record(line, f"{path}:{n}", single_ok=True)
            except DataError as err:
                if skip_bad_lines:
                    continue
                raise DataError(f"{err} (pass skip_bad_lines=true to skip such lines)") from None
            yield from record


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Rows of a (global or per-rank) batch.

    ``encoding`` holds ``[CLS] src [SEP] tgt [SEP]`` rows (segment 1 on ``tgt [SEP]``);
    ``sources`` are the clean source texts of the rows (the teacher's inputs in stage 2);
    ``noised`` marks rows whose source was masked.
    """

    encoding: Encoding
    sources: list[str]
    noised: list[bool]
    labels: torch.Tensor | None = None  # MLM targets (-100 where not predicted)
    all_sources: list[str] | None = None  # a shard's: the sources of the whole global batch (None: ``sources``)

    @property
    def global_sources(self) -> list[str]:
        """The clean sources of every row of the global batch (stage 2 distils over all of them)."""
        return self.sources if self.all_sources is None else self.all_sources

    @property
    def rows(self) -> int:
        return self.encoding.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.encoding.attention_mask.sum())

    def shard(self, rank: int, world: int) -> Batch:
        """Rows ``rank*n/world .. (rank+1)*n/world`` of the batch, re-padded to their own longest row."""
        n = self.rows
        if n % world:
            raise InputError(f"batch of {n} rows does not split evenly over {world} processes")
        lo, hi = rank * n // world, (rank + 1) * n // world
        enc = self.encoding
        length = int(enc.attention_mask[lo:hi].sum(1).max())
        sub = Encoding(enc.input_ids[lo:hi, :length], enc.token_type_ids[lo:hi, :length], enc.attention_mask[lo:hi, :length])
        labels = None if self.labels is None else self.labels[lo:hi, :length]
        return Batch(sub, self.sources[lo:hi], self.noised[lo:hi], labels, self.global_sources)


class PairBatcher:
    """Turns pairs into UniLM rows (a→b then b→a), with noise on the source of some rows.

    The noise of step ``t`` is drawn from ``default_rng([seed, t])``: a batch is a pure function of
    its pairs, the seed and the step, whatever process builds it.
    """

    def __init__(
        self,
        tokenizer: CharTokenizer,
        *,
        maxlen: int = 64,
        noise_row_prob: float = 0.5,
        word_prob: float = 0.15,
        seed: int = 0,
    ):
        if not 0.0 <= noise_row_prob <= 1.0:
            raise InputError(f"noise row probability must be in [0, 1], got {noise_row_prob}")
        self.tokenizer = tokenizer
        self.maxlen = maxlen
        self.row_prob = noise_row_prob
        self.masker = WholeWordMasking(tokenizer, word_prob=word_prob)
        self.seed = seed

    def __call__(self, pairs: Sequence[tuple[str, str]], step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        tok = self.tokenizer
        rows, sources, noised = [], [], []
        for a, b in pairs:
            for src, tgt in ((a, b), (b, a)):
                src_ids, was_noised = noisy_source_ids(self.masker, src, rng, self.row_prob)
                rows.append(tok.build_inputs(src_ids, tok.encode_ids(tgt), max_length=self.maxlen * 2))
                sources.append(src)
                noised.append(was_noised)
        return Batch(tok.pad(rows), sources, noised)


class MLMBatcher:
    """Whole-word-masked single sentences ``[CLS] s [SEP]`` for the optional MLM warm-up."""

    def __init__(self, tokenizer: CharTokenizer, *, maxlen: int = 64, word_prob: float = 0.15, seed: int = 0):
        self.tokenizer = tokenizer
        self.maxlen = maxlen
        self.masker = WholeWordMasking(tokenizer, word_prob=word_prob)
        self.seed = seed

    def __call__(self, texts: Sequence[str], step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        tok = self.tokenizer
        rows, labels = [], []
        for text in texts:
            clean = tok.encode_ids(text)[: self.maxlen - 2]
            noisy, selected = self.masker(text, rng)
            noisy, selected = noisy[: self.maxlen - 2], selected[: self.maxlen - 2]
            if len(noisy) != len(clean):  # jieba split differently from the whole text: no masking
                noisy, selected = clean, [False] * len(clean)
            if clean and not any(selected):  # predict at least one token per row
                k = int(rng.integers(len(clean)))
                noisy = list(noisy)
                noisy[k], selected = tok.mask_id, [i == k for i in range(len(clean))]
            rows.append(tok.build_inputs(noisy, None, max_length=self.maxlen))
            labels.append([-100] + [c if s else -100 for c, s in zip(clean, selected, strict=True)] + [-100])
        enc = tok.pad(rows)
        lab = torch.full_like(enc.input_ids, -100)
        for i, row in enumerate(labels):
            lab[i, : len(row)] = torch.tensor(row)
        return Batch(enc, list(texts), [True] * len(texts), lab)


# --------------------------------------------------------------------------------------------
# batches built ahead in worker processes
# --------------------------------------------------------------------------------------------
_WORKER_BATCHER: Any = None


def _prefetch_worker_init(batcher) -> None:
    global _WORKER_BATCHER
    torch.set_num_threads(1)
    _WORKER_BATCHER = batcher


def _pack(batch: Batch) -> dict:
    enc = batch.encoding
    return {"ids": enc.input_ids.numpy(), "types": enc.token_type_ids.numpy(), "mask": enc.attention_mask.numpy(),
            "sources": batch.sources, "noised": batch.noised,
            "labels": None if batch.labels is None else batch.labels.numpy()}


def _unpack(d: dict) -> Batch:
    enc = Encoding(torch.from_numpy(d["ids"]), torch.from_numpy(d["types"]), torch.from_numpy(d["mask"]))
    labels = None if d["labels"] is None else torch.from_numpy(d["labels"])
    return Batch(enc, d["sources"], d["noised"], labels)


def _prefetch_worker_build(items, step: int) -> dict:
    return _pack(_WORKER_BATCHER(items, step))


class BatchPrefetcher:
    """Builds the batches of the next ``depth`` steps in ``workers`` processes while the model trains.

    A batch is a pure function of its items (pairs or texts), the seed and the step (see
    :class:`PairBatcher`), so a batch built ahead in a worker equals the one the trainer would build
    itself. The items are still drawn from the stream here, in order, and the stream's position
    after each draw is kept with its batch: :meth:`next` returns the batch and the position a
    checkpoint taken after that step must record (not the position of the draws made ahead).

    ``draw()`` returns the items of one global batch; ``start_step`` is the step of the first batch.
    """

    def __init__(self, stream: PairStream, batcher, draw, *, workers: int, depth: int, start_step: int):
        import multiprocessing
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor

        if workers <= 0 or depth <= 0:
            raise InputError(f"the prefetcher needs workers > 0 and depth > 0, got {workers} and {depth}")
        self.stream, self.draw, self.depth = stream, draw, depth
        self.next_step = start_step
        self.queue: deque = deque()
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_prefetch_worker_init, initargs=(batcher,))

    def next(self) -> tuple[Batch, dict]:
        """The next step's batch and the stream position after its draw (a :meth:`PairStream.snapshot`)."""
        while len(self.queue) < self.depth:
            items = self.draw()
            state = self.stream.snapshot()
            self.queue.append((self.pool.submit(_prefetch_worker_build, items, self.next_step), state))
            self.next_step += 1
        future, state = self.queue.popleft()
        return _unpack(future.result()), state

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.queue.clear()
