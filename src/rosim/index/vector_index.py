"""A persistent index of sentence vectors on faiss, with the texts and the encoder's identity beside it.

Vectors are L2-normalised and compared by inner product, so scores are cosines. Three kinds:

- ``exact`` (default): ``IndexFlatIP``, brute force, exact results.
- ``ivf``: ``IndexIVFFlat`` — k-means cells (``nlist``, default about sqrt(n)); a query scans the
  ``nprobe`` nearest cells (default nlist/16, at least 8). Trained on the first vectors added (at least ``39 * nlist`` of them when
  the corpus has that many).
- ``ivfpq``: ``IndexIVFPQ`` — the same cells, each vector stored as ``pq_m`` bytes (product
  quantisation, default dim/8) instead of 4·dim: for corpora whose float vectors do not fit in
  memory; scores are approximate. Needs at least 39 * 256 training vectors for its codebooks.
- ``hnsw``: ``IndexHNSWFlat`` — a navigable small-world graph (``hnsw_m`` links per node, built
  exploring ``ef_construction`` candidates); a query explores ``ef_search`` candidates. No training;
  slowest to build, fast and accurate to query.

Exact search multiplies the queries by the stored vectors with NumPy (BLAS) in blocks; the
approximate kinds search through faiss.

On disk an index is a directory written atomically::

    meta.json       format, kind, parameters, count, encoder identity, pooling, sizes + SHA-256 of the files
    vectors.faiss   the faiss index (faiss' own binary format; no pickling)
    vectors.ivfdata only for an index merged with its cells on disk (``rosim index merge --on-disk``):
                    faiss' OnDiskInvertedLists, memory-mapped when searched instead of read into memory
    texts.jsonl     one JSON string per vector, in id order
    texts.offsets.npy  with vectors.ivfdata: the byte offset of each line of texts.jsonl (and its end),
                    so that the texts are read when a search returns them, not held in memory

Loading checks sizes and checksums, so a truncated or corrupted index is reported as such, and
refuses an encoder whose identity differs from the one that built the index.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rosim.errors import DataError, InputError
from rosim.limits import MAX_EF, MAX_HNSW_M, MAX_NLIST, check_int

FORMAT, FORMAT_VERSION = "rosim-index", 1
META_FILE, VECTORS_FILE, TEXTS_FILE = "meta.json", "vectors.faiss", "texts.jsonl"
IVFDATA_FILE = "vectors.ivfdata"
TEXT_OFFSETS_FILE = "texts.offsets.npy"  # on-disk indexes: where each line of texts.jsonl starts
KINDS = ("exact", "ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")
IDENTITY_KEYS = ("weights", "fingerprint", "dim", "max_length")  # what must match; the name (a path) may differ


class Hit(NamedTuple):
    """One search result: the stored text, its cosine to the query, and its id (insertion order)."""

    text: str
    score: float
    id: int


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about sqrt(n), and at most n / 39 so that k-means has data."""
    return int(max(1, min(round(math.sqrt(n)), n // 39)))


def _faiss():
    import faiss

    return faiss


@contextlib.contextmanager
def faiss_stdout_silenced():
    """faiss' C++ reports on-disk list moves ("resizing …", "updating ondisk filename …") with printf on
    file descriptor 1, which would mix into a command's output: send it to /dev/null meanwhile."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _identity_of(directory: Path) -> tuple[int, int, int] | None:
    """Which directory is at ``directory`` now: inode numbers are reused, so the change time (set
    when a directory is created or renamed into place) comes with it."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _being_written(directory: Path) -> bool:
    return (directory.parent / f".{directory.name}.lock").exists()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _text_of_line(line: bytes, path: Path, number: int, damaged: str) -> str:
    """Line ``number`` of a ``texts.jsonl``: a UTF-8 JSON string, or a DataError naming the file and line."""
    try:
        text = json.loads(line.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = None
    if not isinstance(text, str):
        raise DataError(f"{path}:{number} is not a JSON string{damaged}")
    return text


def read_texts_jsonl(path: Path, count: int, *, damaged: str = "") -> list[str]:
    """The ``count`` texts of a ``texts.jsonl`` (one JSON string per line, as an index or a shard
    stores them); a line that is not a UTF-8 JSON string, or another number of lines, is a DataError
    naming the file (and line), followed by ``damaged`` (what to do about it)."""
    with open(path, "rb") as f:
        texts = [_text_of_line(line, path, number, damaged) for number, line in enumerate(f, start=1)]
    if len(texts) != count:
        raise DataError(f"{path} holds {len(texts)} texts, meta.json says {count}{damaged}")
    return texts


class TextsOnDisk(Sequence):
    """An on-disk index's texts, read when asked for: ``offsets[i]`` is where line ``i`` of
    ``texts.jsonl`` starts (``offsets[-1]`` its end), memory-mapped, so memory is not the texts but
    the pages of offsets touched. A line that is not a JSON string is a DataError when it is read."""

    def __init__(self, path: Path, offsets: np.ndarray, damaged: str = ""):
        self.path, self._offsets, self._damaged = path, offsets, damaged
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (kept open: one pread per text)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, IndexError
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        return _text_of_line(os.pread(self._file.fileno(), end - start, start), self.path, i + 1, self._damaged)

    def __del__(self):
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


def _read_text_offsets(directory: Path, count: int, damaged: str) -> np.ndarray:
    offsets = np.load(directory / TEXT_OFFSETS_FILE, mmap_mode="r", allow_pickle=False)
    size = (directory / TEXTS_FILE).stat().st_size
    if offsets.dtype != np.uint64 or offsets.shape != (count + 1,) or offsets[0] != 0 or offsets[-1] != size:
        raise DataError(f"{directory / TEXT_OFFSETS_FILE} does not describe {TEXTS_FILE} ({count} texts, "
                        f"{size} bytes){damaged}")
    return offsets


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_texts(encoder, texts: list[str], pooling: str | None, batch_size: int) -> np.ndarray:
    """Unit vectors ``(n, dim)`` float32 of ``texts``; ``pooling`` None for encoders without a choice (teachers)."""
    kwargs = {"batch_size": batch_size, "normalize": True, "show_progress_bar": False}
    if pooling is not None:
        kwargs["pooling"] = pooling
    return np.asarray(encoder.encode(texts, **kwargs), dtype=np.float32)


def exact_topk(db: np.ndarray, queries: np.ndarray, k: int, *, max_block_floats: int = 1 << 25):
    """Exact top-``k`` inner products: blockwise BLAS matrix products with a running top-k.

    Memory: one ``(q, block)`` score matrix at a time (at most ``max_block_floats`` floats).
    Results are sorted by score, equal scores by id.
    """
    nq, n = len(queries), len(db)
    k = min(k, n)
    block = max(1024, max_block_floats // max(nq, 1))
    best_s = np.empty((nq, 0), dtype=np.float32)
    best_i = np.empty((nq, 0), dtype=np.int64)
    for start in range(0, n, block):
        sims = queries @ db[start:start + block].T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < sims.shape[1] else \
            np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        order = _order(cand_s, cand_i)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_s, best_i


def _order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row: indices sorting by score descending, then id ascending."""
    by_id = np.argsort(ids, axis=1, kind="stable")
    by_score = np.argsort(-np.take_along_axis(scores, by_id, 1), axis=1, kind="stable")
    return np.take_along_axis(by_id, by_score, 1)


def identity_mismatch(stored: dict | None, given: dict) -> str | None:
    """Why ``given`` is not the encoder recorded as ``stored`` (None when they match)."""
    if not stored:
        return None
    diffs = [k for k in IDENTITY_KEYS if k in stored and k in given and stored[k] != given[k]]
    if stored.get("teacher") != given.get("teacher"):
        diffs.insert(0, "teacher")
    if not diffs:
        return None
    what = ", ".join(f"{k} {stored.get(k)!r} vs {given.get(k)!r}" for k in diffs)
    return (f"built with {stored.get('name')!r}, but the encoder given is {given.get('name')!r} ({what}); "
            "vectors from different models are not comparable: search with the model that built the index "
            "(--model) or rebuild the index with this one")


class VectorIndex:
    """Texts and their unit vectors in a faiss inner-product index; ``add``, ``search``, ``save``, ``load``.

    ``encoder_identity`` (``SimModel.identity()``) and ``pooling`` record how the vectors were made;
    ``add_texts`` / ``search_texts`` refuse an encoder with another identity.
    """

    def __init__(self, dim: int, *, kind: str = "exact", encoder_identity: dict | None = None,
                 pooling: str | None = "pooler", nlist: int | None = None, nprobe: int | None = None,
                 hnsw_m: int = 32, ef_construction: int = 40, ef_search: int = 64, pq_m: int | None = None):
        if not isinstance(dim, int) or dim <= 0:
            raise InputError(f"dim must be a positive integer, got {dim!r}")
        if kind not in KINDS:
            raise InputError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        nlist, nprobe, hnsw_m, ef_construction, ef_search, pq_m = (
            None if value is None else check_int(name, value, 1, most)  # NumPy ints become ints
            for name, value, most in (("nlist", nlist, MAX_NLIST), ("nprobe", nprobe, MAX_NLIST),
                                      ("hnsw_m", hnsw_m, MAX_HNSW_M), ("ef_construction", ef_construction, MAX_EF),
                                      ("ef_search", ef_search, MAX_EF), ("pq_m", pq_m, dim)))
        self.dim, self.kind = dim, kind
        self.encoder_identity = dict(encoder_identity) if encoder_identity else None
        self.pooling = pooling
        self.nlist, self.nprobe = nlist, nprobe
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        if kind == "ivfpq":
            self.pq_m = dim // 8 if pq_m is None else pq_m
            if dim % self.pq_m:
                raise InputError(f"pq_m must divide the dimension {dim}, got {self.pq_m}")
        else:
            self.pq_m = pq_m
        self.texts: list[str] = []
        self._index = None if kind in IVF_KINDS else self._new_index()

    # ---------------------------------------------------------------------------------- structure
    def _new_index(self, nlist: int | None = None):
        faiss = _faiss()
        if self.kind == "exact":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
            return index
        # "np": no polysemous training, a code-permutation search (simulated annealing) that only helps
        # Hamming-distance pre-filtering, which we never use; it was 40 of 44 s of training 10k vectors and
        # left ids and scores identical (measured)
        codes = f"PQ{self.pq_m}np" if self.kind == "ivfpq" else "Flat"
        return faiss.index_factory(self.dim, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)

    @property
    def min_train_size(self) -> int:
        """Training vectors worth collecting beyond 64 per cell: 39 per PQ centroid (faiss' own advice)."""
        return 39 * 256 if self.kind == "ivfpq" else 0

    @property
    def needs_training(self) -> bool:
        """An IVF kind whose cells are not trained yet (``train``, or the first ``add``, trains them)."""
        return self.kind in IVF_KINDS and not self.is_trained

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def _on_disk_lists(self):
        """faiss' OnDiskInvertedLists of an index merged with ``on_disk``; None for one held in memory."""
        if self.kind not in IVF_KINDS or self._index is None:
            return None
        faiss = _faiss()
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(self._index).invlists)
        return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None

    @property
    def on_disk(self) -> bool:
        """Whether the IVF cells live in ``vectors.ivfdata`` (memory-mapped) rather than in memory."""
        return self._on_disk_lists() is not None

    def __repr__(self) -> str:
        params = f", nlist={self.nlist}, nprobe={self._nprobe()}" if self.kind in IVF_KINDS else (
            f", m={self.hnsw_m}, ef_search={self.ef_search}" if self.kind == "hnsw" else "")
        name = (self.encoder_identity or {}).get("name")
        return f"VectorIndex(kind={self.kind!r}, dim={self.dim}, ntotal={self.ntotal}{params}, encoder={name!r})"

    def _nprobe(self) -> int:
        if self.nprobe is not None:
            return self.nprobe
        nlist = self.nlist or 1
        return max(min(8, nlist), round(nlist / 16))

    def _check_vectors(self, vectors) -> np.ndarray:
        x = np.array(vectors, dtype=np.float32, copy=True, order="C")
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"expected vectors of shape (n, {self.dim}), got {tuple(np.shape(vectors))}")
        if not np.isfinite(x).all():
            raise InputError("vectors contain NaN or infinite values")
        norms = np.linalg.norm(x, axis=1)
        if (norms == 0).any():
            raise InputError(f"vector {int(np.argmin(norms))} is all zeros and has no direction")
        x /= norms[:, None]
        return x

    def train(self, vectors, *, expected_total: int | None = None) -> None:
        """Train the IVF cells on ``vectors`` (a representative sample). A no-op for other kinds."""
        if not self.needs_training:
            return
        x = self._check_vectors(vectors)
        nlist = self.nlist or default_nlist(max(expected_total or 0, len(x)))
        if len(x) < nlist:
            raise InputError(f"an IVF index with nlist={nlist} needs at least {nlist} vectors to train, got {len(x)}")
        if self.kind == "ivfpq" and len(x) < 256:
            raise InputError(f"an IVF-PQ index needs at least 256 vectors to train its codebooks, got {len(x)}")
        self.nlist = nlist
        index = self._new_index(nlist)
        index.train(x)
        self._index = index

    # ---------------------------------------------------------------------------------- adding
    def add(self, texts: Sequence[str], vectors) -> None:
        """Add texts with their vectors (normalised here). An untrained IVF index trains on them first."""
        if isinstance(texts, str):
            texts = [texts]
        x = self._check_vectors(vectors)
        if len(texts) != len(x):
            raise InputError(f"got {len(texts)} texts but {len(x)} vectors")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text {i} is a {type(t).__name__}, expected str")
        if not len(x):
            return
        if self.on_disk:
            raise InputError("this index keeps its cells on disk (`rosim index merge --on-disk`) and cannot grow: "
                             "encode the new texts as shards and merge again")
        if self.needs_training:
            self.train(x)
        self._index.add(x)
        self.texts.extend(texts)

    def check_encoder(self, encoder) -> dict:
        """The encoder's identity; an :class:`InputError` if it is not the one that built the index."""
        given = encoder.identity()
        if given.get("dim") not in (None, self.dim):
            built_with = (self.encoder_identity or {}).get("name")
            raise InputError(f"the encoder makes {given.get('dim')}-d vectors but this index holds {self.dim}-d vectors "
                             f"(built with {built_with!r}): search with that model or rebuild the index")
        problem = identity_mismatch(self.encoder_identity, given)
        if problem:
            raise InputError(f"this index was {problem}")
        return given


    def add_texts(self, encoder, texts: Iterable[str], *, batch_size: int = 64, chunk_size: int = 4096,
                  total: int | None = None, show_progress_bar: bool | None = None) -> int:
        """Encode and add ``texts`` (any iterable, consumed ``chunk_size`` at a time); returns how many.

        Memory stays bounded by one chunk of vectors, plus, for an untrained IVF index, the training
        sample (``64 * nlist`` vectors, where nlist comes from ``total`` when it is known).
        """
        from tqdm.auto import tqdm

        if batch_size <= 0 or chunk_size <= 0:
            raise InputError("batch_size and chunk_size must be positive")
        given = self.check_encoder(encoder)
        if self.encoder_identity is None:
            self.encoder_identity = given
        if show_progress_bar is None:
            import sys

            show_progress_bar = sys.stderr.isatty()
        bar = tqdm(total=total, desc="index", unit="text", disable=not show_progress_bar, leave=False)
        pending_texts: list[str] = []
        pending: list[np.ndarray] = []
        train_size = None
        if self.needs_training:
            nlist = self.nlist or (default_nlist(total) if total else None)
            train_size = max(64 * nlist, self.min_train_size) if nlist else 100_000
        added = 0
        try:
            for chunk in _chunks(texts, chunk_size):
                vecs = encode_texts(encoder, chunk, self.pooling, batch_size)
                if train_size is None:
                    self.add(chunk, vecs)
                else:
                    pending_texts += chunk
                    pending.append(vecs)
                    if len(pending_texts) >= train_size:
                        self.train(np.concatenate(pending), expected_total=total)
                        self.add(pending_texts, np.concatenate(pending))
                        pending_texts, pending, train_size = [], [], None
                added += len(chunk)
                bar.update(len(chunk))
            if pending_texts:
                self.train(np.concatenate(pending), expected_total=total)
                self.add(pending_texts, np.concatenate(pending))
        finally:
            bar.close()
        return added

    @classmethod
    def build(cls, encoder, texts: Iterable[str], *, kind: str = "exact", pooling: str | None = "pooler",
              batch_size: int = 64, total: int | None = None, show_progress_bar: bool | None = None,
              **params) -> VectorIndex:
        """A new index of ``texts`` encoded by ``encoder`` (a ``SimModel`` or a teacher)."""
        if not hasattr(encoder, "encode") or not hasattr(encoder, "identity"):
            raise InputError("encoder must have encode() and identity() (a SimModel or a teacher)")
        ident = encoder.identity()
        if ident.get("teacher"):
            pooling = None
        index = cls(int(ident["dim"]), kind=kind, encoder_identity=ident, pooling=pooling, **params)
        if index.add_texts(encoder, texts, batch_size=batch_size, total=total,
                           show_progress_bar=show_progress_bar) == 0:
            raise InputError("no texts to index")
        return index

    @classmethod
    def from_file(cls, encoder, path: str | os.PathLike, **kwargs) -> VectorIndex:
        """Index every non-empty line of a UTF-8 text file, streaming it (counted first for the bar)."""
        from rosim.textio import iter_lines

        total = sum(1 for _ in iter_lines(path))
        if total == 0:
            raise InputError(f"{path} contains no texts to index")
        return cls.build(encoder, (line for _, line in iter_lines(path)), total=total, **kwargs)

    # ---------------------------------------------------------------------------------- searching
    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Cosines ``(q, k')`` and ids ``(q, k')`` of the nearest stored vectors, best first.

        ``k' = min(k, ntotal)``. Approximate kinds may return fewer than ``k'`` hits for a query;
        missing slots have id -1 and score -inf.
        """
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if self.ntotal == 0:
            raise InputError("the index is empty: add texts before searching")
        q = self._check_vectors(queries)
        if not len(q):
            raise InputError("no queries given")
        k = min(int(k), self.ntotal)
        if self.kind == "exact":
            # faiss keeps the vectors; the products go through NumPy's BLAS, which is several times
            # faster than faiss' flat scan in the faiss-cpu wheels measured (benchmarks/search.py)
            return exact_topk(self._stored_flat(), q, k)
        if self.kind in IVF_KINDS:
            self._index.nprobe = self._nprobe()
        elif self.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.ef_search, k)
        scores, ids = self._index.search(q, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def search_texts(self, encoder, queries: str | Sequence[str], k: int = 10, *,
                     batch_size: int = 64) -> list[Hit] | list[list[Hit]]:
        """Encode ``queries`` with ``encoder`` (checked against the index) and return their hits."""
        single = isinstance(queries, str)
        items = [queries] if single else list(queries)
        if not items:
            raise InputError("no queries given")
        if self.ntotal == 0:
            raise InputError("the index is empty: add texts before searching")
        self.check_encoder(encoder)
        scores, ids = self.search(encode_texts(encoder, items, self.pooling, batch_size), k)
        hits = [[Hit(self.texts[j], float(s), int(j)) for s, j in zip(srow, irow, strict=True) if j >= 0]
                for srow, irow in zip(scores, ids, strict=True)]
        return hits[0] if single else hits

    def _stored_flat(self) -> np.ndarray:
        """A zero-copy view of an exact index's vectors ``(ntotal, dim)``."""
        faiss = _faiss()
        return faiss.rev_swig_ptr(self._index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)

    def vectors(self) -> np.ndarray:
        """All stored vectors ``(ntotal, dim)`` in id order (reconstructed from faiss)."""
        if self.ntotal == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.kind in IVF_KINDS:  # ivfpq: the decoded (approximate) vectors
            self._index.make_direct_map()
        return self._index.reconstruct_n(0, self.ntotal)

    # ---------------------------------------------------------------------------------- persistence
    def meta(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
            "count": self.ntotal, "metric": "cosine (inner product of L2-normalised vectors)",
            "encoder": self.encoder_identity, "pooling": self.pooling,
            "params": {"nlist": self.nlist, "nprobe": self.nprobe, "hnsw_m": self.hnsw_m,
                       "ef_construction": self.ef_construction, "ef_search": self.ef_search, "pq_m": self.pq_m},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index directory atomically (a temporary sibling renamed into place).

        An existing directory is replaced only if it is a rosim index (or empty).
        """
        from rosim.textio import atomic_directory

        if self.ntotal == 0:
            raise InputError("nothing to save: the index is empty")
        directory = Path(directory)
        if directory.exists():
            if not directory.is_dir():
                raise InputError(f"{directory} exists and is not a directory")
            if any(directory.iterdir()) and not (directory / META_FILE).is_file():
                raise InputError(f"{directory} exists and is not a rosim index; refusing to replace it "
                                 "(choose a new directory or remove it)")
        with atomic_directory(directory) as tmp:
            lists = self._on_disk_lists()
            if lists is not None:
                shutil.copyfile(lists.filename, tmp / IVFDATA_FILE)
            self.write_files(tmp, self.texts)
        return directory

    def write_files(self, directory: Path, texts: Iterable[str]) -> None:
        """Write ``vectors.faiss``, ``texts.jsonl`` and ``meta.json`` into ``directory`` (a temporary one
        being made atomically); an on-disk index's ``vectors.ivfdata`` must be there already."""
        faiss = _faiss()
        on_disk = self.on_disk
        names = (VECTORS_FILE, TEXTS_FILE) + ((IVFDATA_FILE, TEXT_OFFSETS_FILE) if on_disk else ())
        faiss.write_index(self._index, str(directory / VECTORS_FILE))
        offsets = (np.lib.format.open_memmap(directory / TEXT_OFFSETS_FILE, mode="w+", dtype=np.uint64,
                                             shape=(self.ntotal + 1,)) if on_disk else None)
        written, position = 0, 0
        with open(directory / TEXTS_FILE, "wb") as f:
            for t in texts:
                line = (json.dumps(t, ensure_ascii=False) + "\n").encode("utf-8")
                if offsets is not None and written < self.ntotal:
                    offsets[written] = position
                f.write(line)
                written, position = written + 1, position + len(line)
        if written != self.ntotal:
            raise DataError(f"{written} texts for {self.ntotal} vectors")
        if offsets is not None:
            offsets[written] = position
            offsets.flush()
            del offsets
        meta = self.meta()
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["files"] = {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
                         for name in names}
        (directory / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder=None, *, verify: bool = True) -> VectorIndex:
        """Read an index directory; with ``encoder``, refuse it unless it built the index.

        ``verify`` checks each file's size and SHA-256 against ``meta.json`` (reads the files once).
        A save that replaces the directory while it is read (its files then disagree) makes the load
        start again on the new directory, rather than report a damaged index.
        """
        directory = Path(directory)
        for attempt in range(20):
            before = _identity_of(directory)
            try:
                return cls._load_once(directory, encoder, verify=verify)
            except (DataError, FileNotFoundError):
                after = _identity_of(directory)
                replaced = before != after or _being_written(directory)
                if not replaced or attempt == 19:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, directory: Path, encoder, *, verify: bool) -> VectorIndex:
        if not directory.exists():
            raise InputError(f"index directory not found: {directory}")
        if not directory.is_dir():
            raise InputError(f"{directory} is a file; an index is a directory made by `rosim index build`")
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise InputError(f"{directory} is not a rosim index ({META_FILE} not found)")
        damaged = f"; the index in {directory} is damaged: rebuild it with `rosim index build`"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{meta_path} is not valid JSON ({exc}){damaged}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{meta_path} does not describe a rosim index{damaged}")
        if meta.get("version") != FORMAT_VERSION:
            raise DataError(f"{directory} is a version {meta.get('version')} index; this rosim reads version "
                            f"{FORMAT_VERSION}: rebuild it")
        try:
            files, count, dim = meta["files"], int(meta["count"]), int(meta["dim"])
            if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
                raise TypeError(f"'files' must map file names to {{bytes, sha256}}, got {files!r:.80}")
            params = dict(meta.get("params") or {})
            index = cls(dim, kind=meta["kind"], encoder_identity=meta.get("encoder"),
                        pooling=meta.get("pooling"), **params)
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise DataError(f"{meta_path} is missing or has a bad field ({exc}){damaged}") from None
        on_disk = tuple(name for name in (IVFDATA_FILE, TEXT_OFFSETS_FILE) if name in files)
        for name in (VECTORS_FILE, TEXTS_FILE) + on_disk:
            path = directory / name
            if not path.is_file():
                raise DataError(f"{path} is missing{damaged}")
            expected = files.get(name, {})
            size = path.stat().st_size
            if "bytes" in expected and size != expected["bytes"]:
                state = "truncated" if size < expected["bytes"] else "longer than recorded"
                raise DataError(f"{path} is {state} ({size} bytes, {expected['bytes']} expected){damaged}")
            if verify and "sha256" in expected and _sha256(path) != expected["sha256"]:
                raise DataError(f"{path} is corrupt (its SHA-256 does not match meta.json){damaged}")
        faiss = _faiss()
        try:
            if IVFDATA_FILE in files:  # the lists file is looked for beside vectors.faiss, wherever that moved
                with faiss_stdout_silenced():
                    raw = faiss.read_index(str(directory / VECTORS_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
            else:
                raw = faiss.read_index(str(directory / VECTORS_FILE))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
            raise DataError(f"{directory / VECTORS_FILE} is not a readable faiss index ({first}){damaged}") from None
        if raw.d != dim or raw.ntotal != count:
            raise DataError(f"{directory}: meta.json says {count} vectors of dim {dim}, the faiss index holds "
                            f"{raw.ntotal} of dim {raw.d}{damaged}")
        if TEXT_OFFSETS_FILE in files:
            texts = TextsOnDisk(directory / TEXTS_FILE, _read_text_offsets(directory, count, damaged), damaged)
        else:
            texts = read_texts_jsonl(directory / TEXTS_FILE, count, damaged=damaged)
        index._index, index.texts = raw, texts
        if encoder is not None:
            index.check_encoder(encoder)
        return index
