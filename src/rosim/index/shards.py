"""A corpus past one machine: encode it in shards (one worker per rank), then build one index from them.

Shard ``j`` holds the corpus' texts ``j * S`` to ``(j + 1) * S - 1`` (``S`` = ``shard_size``; texts
are the non-empty lines, numbered as ``rosim index build`` reads them). Rank ``r`` of ``W`` workers
encodes shards ``r, r + W, r + 2W, …``; ranks need no communication, so any launcher works:
``torchrun`` (``RANK``/``WORLD_SIZE``), a SLURM array, or ``--rank``/``--world-size`` by hand.

Each shard is a directory written atomically (a temporary sibling renamed into place)::

    shards/shard-000003/  meta.json  vectors.npy (float32, L2-normalised)  texts.jsonl

``meta.json`` records the shard, its first text and count, the corpus (bytes and SHA-256), the shard
size, the encoder's identity and pooling, and each file's size and SHA-256. A killed worker leaves
no shard (only a temporary directory, removed on the next run), so re-running the same command
redoes exactly the missing shards and skips the finished ones: a shard is whole or absent.

:func:`build_from_shards` checks that every shard is there and that all come from the same corpus,
model and shard size, trains the IVF cells on a uniform sample drawn across shards, and adds the
shards a block of vectors at a time: memory is the index, the texts and one block. With ``on_disk``
the index's cells never sit in memory either: they are merged into one memory-mapped file (faiss'
``OnDiskInvertedLists``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rosim.errors import DataError, InputError
from rosim.index.vector_index import (
    IVF_KINDS,
    IVFDATA_FILE,
    VectorIndex,
    _faiss,
    _sha256,
    default_nlist,
    encode_texts,
    faiss_stdout_silenced,
    identity_mismatch,
    read_texts_jsonl,
)
from rosim.limits import check_int

FORMAT, FORMAT_VERSION = "rosim-shard", 1
META_FILE, VECTORS_FILE, TEXTS_FILE = "meta.json", "vectors.npy", "texts.jsonl"
_SHARD_NAME = re.compile(r"^shard-(\d{6})$")
MAX_SHARD_SIZE = 10_000_000  # texts per shard: its vectors are held in memory while it is encoded
ADD_ROWS = 1 << 16  # vectors read and added at a time when an index is built from shards


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def launcher_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``); ``(0, 1)`` alone."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                         "are not integers") from None
    return rank, world


def corpus_fingerprint(path: str | os.PathLike) -> dict:
    """Size, SHA-256 and text count of a corpus file (one streaming pass): what every shard records."""
    from rosim.textio import iter_lines

    path = Path(path)
    h, size = hashlib.sha256(), 0
    if not path.is_file():
        raise InputError(f"corpus not found: {path}" if not path.exists() else f"{path} is not a file")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            size += len(block)
    texts = sum(1 for _ in iter_lines(path))
    if texts == 0:
        raise InputError(f"{path} contains no texts to index")
    return {"bytes": size, "sha256": h.hexdigest(), "texts": texts}


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


@dataclass(frozen=True)
class Shard:
    """A finished shard on disk (its ``meta.json`` read and its files' sizes checked)."""

    path: Path
    meta: dict

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    def vectors(self, *, verify: bool = True, mmap: bool = False) -> np.ndarray:
        path = self.path / VECTORS_FILE
        if verify and _sha256(path) != self.meta["files"][VECTORS_FILE]["sha256"]:
            raise DataError(f"{path} is corrupt (its SHA-256 does not match meta.json); delete {self.path} "
                            "and run the encode command again to redo it")
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if x.dtype != np.float32 or x.shape != (self.count, int(self.meta["dim"])):
            raise DataError(f"{path} holds {x.dtype} {x.shape}, meta.json says float32 ({self.count}, {self.meta['dim']})")
        return x

    def _layout(self, verify: bool) -> tuple[int, int]:
        """``(byte offset of the first vector, dim)`` of ``vectors.npy``, its dtype and shape checked."""
        header = self.vectors(verify=verify, mmap=True)
        return header.offset, header.shape[1]

    def vector_blocks(self, rows: int = ADD_ROWS, *, verify: bool = True):
        """The vectors ``rows`` at a time, read from the file rather than memory-mapped, so that only one
        block is ever resident."""
        offset, dim = self._layout(verify)
        with open(self.path / VECTORS_FILE, "rb") as f:
            for lo in range(0, self.count, rows):
                n = min(rows, self.count - lo)
                f.seek(offset + lo * dim * 4)
                block = np.fromfile(f, dtype=np.float32, count=n * dim)
                if block.size != n * dim:
                    raise DataError(f"{self.path / VECTORS_FILE} ended early; delete {self.path} and run the encode "
                                    "command again to redo it")
                yield lo, block.reshape(n, dim)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """The vectors at ``indices``, each read from the file: no other page is brought into memory (a
        memory-mapped gather would read ahead around each row and so page in most of the file)."""
        offset, dim = self._layout(verify=False)
        size = dim * 4
        out = np.empty((len(indices), dim), dtype=np.float32)
        with open(self.path / VECTORS_FILE, "rb", buffering=0) as f:
            for i, row in enumerate(indices):
                out[i] = np.frombuffer(os.pread(f.fileno(), size, offset + int(row) * size), dtype=np.float32)
        return out

    def texts(self) -> list[str]:
        return read_texts_jsonl(self.path / TEXTS_FILE, self.count,
                                damaged=f"; delete {self.path} and run the encode command again to redo it")


def read_shard(path: Path) -> Shard:
    """A shard directory, checked: its meta.json parses and its files have the recorded sizes."""
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} has no {META_FILE}: not a finished shard") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_path} is not valid JSON ({exc})") from None
    try:
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
        for key in ("shard", "first", "count", "dim", "shard_size"):
            if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
                raise ValueError(f"{key} = {meta[key]!r}")
        for name in (VECTORS_FILE, TEXTS_FILE):
            entry = meta["files"][name]
            if (path / name).stat().st_size != entry["bytes"]:
                raise ValueError(f"{name} has {(path / name).stat().st_size} bytes, {entry['bytes']} recorded")
    except (AttributeError, KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"{path} is not a whole rosim shard ({exc}); delete it and run the encode command "
                        "again to redo it") from None
    return Shard(path, meta)


def _check_same_job(meta: dict, expected: dict, where: Path) -> None:
    """A shard belongs to this job: same corpus, shard size, pooling and encoder."""
    if meta["corpus"] != expected["corpus"]:
        raise InputError(f"{where} was encoded from another corpus (or the corpus changed since): "
                         "use a new shard directory")
    if meta["shard_size"] != expected["shard_size"]:
        raise InputError(f"{where} was made with --shard-size {meta['shard_size']}, not {expected['shard_size']}: "
                         "use the same shard size or a new shard directory")
    if meta.get("pooling") != expected.get("pooling"):
        raise InputError(f"{where} was made with pooling {meta.get('pooling')!r}, not {expected.get('pooling')!r}")
    if meta["dim"] != expected["dim"]:
        raise InputError(f"{where} holds {meta['dim']}-d vectors, this job makes {expected['dim']}-d vectors")
    problem = identity_mismatch(meta.get("encoder"), expected["encoder"])
    if problem:
        raise InputError(f"{where} was {problem}; use a new shard directory")


def encode_shards(encoder, corpus: str | os.PathLike, out_dir: str | os.PathLike, *, shard_size: int = 100_000,
                  rank: int | None = None, world_size: int | None = None, pooling: str | None = "pooler",
                  batch_size: int = 64, show_progress_bar: bool | None = None) -> list[int]:
    """Encode this rank's shards of ``corpus`` into ``out_dir``; returns the shards written now.

    Finished shards of the same job are skipped (so a re-run after a kill redoes only what is
    missing); a shard from another corpus, model, pooling or shard size is an error.
    """
    from tqdm.auto import tqdm

    from rosim.textio import iter_lines

    shard_size = check_int("shard_size", shard_size, 1, MAX_SHARD_SIZE)
    batch_size = check_int("batch_size", batch_size, 1, 1 << 16)
    env_rank, env_world = launcher_rank()
    world_size = check_int("world_size", env_world if world_size is None else world_size, 1, 1 << 20)
    rank = check_int("rank", env_rank if rank is None else rank, 0, world_size - 1)
    if not hasattr(encoder, "encode") or not hasattr(encoder, "identity"):
        raise InputError("encoder must have encode() and identity() (a SimModel or a teacher)")
    ident = encoder.identity()
    if ident.get("teacher"):
        pooling = None
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    fingerprint = corpus_fingerprint(corpus)
    job = {"corpus": fingerprint, "shard_size": shard_size, "pooling": pooling, "dim": int(ident["dim"]),
           "encoder": ident}
    n_shards = -(-fingerprint["texts"] // shard_size)
    mine = [j for j in range(rank, n_shards, world_size)]
    todo = []
    for j in mine:
        path = out_dir / shard_name(j)
        if path.exists():
            _check_same_job(read_shard(path).meta, job, path)
            continue
        todo.append(j)
    if show_progress_bar is None:
        import sys

        show_progress_bar = sys.stderr.isatty()
    bar = tqdm(total=sum(min(shard_size, fingerprint["texts"] - j * shard_size) for j in todo),
               desc=f"rank {rank}/{world_size}", unit="text", disable=not show_progress_bar, leave=False)
    pending, texts = set(todo), []
    try:
        for position, (_, line) in enumerate(iter_lines(corpus)):
            j = position // shard_size
            if j in pending:
                texts.append(line)
                if len(texts) == shard_size or position == fingerprint["texts"] - 1:
                    _write_shard(out_dir / shard_name(j), encoder, texts, j, job, batch_size)
                    bar.update(len(texts))
                    pending.discard(j)
                    texts = []
                    if not pending:
                        break
    finally:
        bar.close()
    if pending:  # the corpus is shorter than it was when fingerprinted
        raise DataError(f"{corpus} changed while it was read; its shards {sorted(pending)} were not written")
    return todo


def _write_shard(path: Path, encoder, texts: list[str], index: int, job: dict, batch_size: int) -> None:
    from rosim.textio import atomic_directory

    vectors = encode_texts(encoder, texts, job["pooling"], batch_size)
    if vectors.shape != (len(texts), job["dim"]):
        raise DataError(f"the encoder returned {vectors.shape} vectors for {len(texts)} texts of dim {job['dim']}")
    with atomic_directory(path) as tmp:
        np.save(tmp / VECTORS_FILE, vectors, allow_pickle=False)
        with open(tmp / TEXTS_FILE, "w", encoding="utf-8", newline="\n") as f:
            for t in texts:
                f.write(json.dumps(t, ensure_ascii=False) + "\n")
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "shard": index, "first": index * job["shard_size"],
                "count": len(texts), **job,
                "files": {name: _file_entry(tmp / name) for name in (VECTORS_FILE, TEXTS_FILE)}}
        (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def list_shards(shard_dir: str | os.PathLike) -> list[Shard]:
    """Every shard of a finished job, in order; an error names what is missing or does not belong."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise InputError(f"shard directory not found: {shard_dir}" if not shard_dir.exists()
                         else f"{shard_dir} is not a directory")
    found = sorted(p for p in shard_dir.iterdir() if _SHARD_NAME.match(p.name))
    if not found:
        raise InputError(f"{shard_dir} holds no shards (made by `rosim index encode`)")
    shards = [read_shard(p) for p in found]
    first = shards[0].meta
    job = {k: first[k] for k in ("corpus", "shard_size", "pooling", "dim", "encoder")}
    for s in shards[1:]:
        _check_same_job(s.meta, job, s.path)
    expected = -(-first["corpus"]["texts"] // first["shard_size"])
    have = {s.meta["shard"] for s in shards}
    missing = sorted(set(range(expected)) - have)
    if missing:
        shown = ", ".join(shard_name(j) for j in missing[:5]) + (" …" if len(missing) > 5 else "")
        raise InputError(f"{shard_dir} lacks {len(missing)} of {expected} shards ({shown}): run the encode "
                         "command again (with the same ranks) to finish them")
    if have != set(range(expected)) or [s.meta["shard"] for s in shards] != list(range(expected)):
        raise InputError(f"{shard_dir} holds shards numbered past the {expected} its corpus makes")
    return shards


def build_from_shards(shard_dir: str | os.PathLike, *, kind: str = "ivf", train_size: int | None = None,
                      seed: int = 0, verify: bool = True, on_disk: str | os.PathLike | None = None,
                      **params) -> VectorIndex:
    """One :class:`VectorIndex` from a finished shard directory (texts in corpus order).

    IVF kinds train on ``train_size`` vectors (default ``64 * nlist``, at most all) drawn uniformly
    without replacement across the shards, then every shard is added in turn.

    ``on_disk=DIR`` (IVF kinds) writes the index straight into ``DIR`` (atomically) with its cells in
    ``DIR/vectors.ivfdata``, and returns it loaded from there, the cells memory-mapped: building and
    searching it hold the coarse centroids (and PQ codebooks) in memory, not the vectors or codes.
    """
    if on_disk is not None and kind not in IVF_KINDS:
        raise InputError(f"cells on disk need an IVF index (ivf or ivfpq), not {kind!r}")
    shards = list_shards(shard_dir)
    meta = shards[0].meta
    total = sum(s.count for s in shards)
    index = VectorIndex(int(meta["dim"]), kind=kind, encoder_identity=meta["encoder"], pooling=meta["pooling"],
                        **params)
    if index.needs_training:
        nlist = index.nlist or default_nlist(total)
        size = min(total, train_size or max(64 * nlist, index.min_train_size))
        check_int("train_size", size, 1, total)
        picks = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))
        starts = np.cumsum([0] + [s.count for s in shards])
        sample = []
        for s, lo, hi in zip(shards, starts[:-1], starts[1:], strict=True):
            rows = picks[(picks >= lo) & (picks < hi)] - lo
            if len(rows):
                sample.append(s.rows(rows))
        index.train(np.concatenate(sample), expected_total=total)
    if on_disk is not None:
        return _merge_on_disk(index, shards, Path(on_disk), verify)
    for s in shards:
        texts = s.texts()
        for lo, block in s.vector_blocks(verify=verify):
            index.add(texts[lo:lo + len(block)], block)
    return index


def _merge_on_disk(index: VectorIndex, shards: list[Shard], out_dir: Path, verify: bool) -> VectorIndex:
    """Each shard is added to a copy of the trained (empty) index with ids ``first .. first + count - 1``
    and written as a faiss file; faiss then concatenates the shards' lists cell by cell into one
    ``OnDiskInvertedLists`` file, reading the shard files memory-mapped. Memory: one shard's cells
    (its codes, for ivfpq) plus one block of vectors."""
    from faiss.contrib.ondisk import merge_ondisk

    from rosim.textio import atomic_directory

    faiss = _faiss()
    with atomic_directory(out_dir) as tmp:
        parts, first = [], 0
        for s in shards:
            part = faiss.clone_index(index._index)
            for _, block in s.vector_blocks(verify=verify):
                part.add_with_ids(index._check_vectors(block), np.arange(first, first + len(block), dtype=np.int64))
                first += len(block)
            parts.append(tmp / f"cells-{s.meta['shard']:06d}.faiss")
            faiss.write_index(part, str(parts[-1]))
            del part
        with faiss_stdout_silenced():
            merge_ondisk(index._index, [str(p) for p in parts], str(tmp / IVFDATA_FILE))
        for p in parts:
            p.unlink()
        index.write_files(tmp, (t for s in shards for t in s.texts()))
    return VectorIndex.load(out_dir, verify=False)
