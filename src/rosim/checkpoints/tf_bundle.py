"""Read TensorFlow checkpoints (the "tensor bundle" format) without TensorFlow.

A checkpoint ``PREFIX`` is two or more files:

* ``PREFIX.index``: a LevelDB-style SSTable (uncompressed blocks of prefix-compressed key/value
  entries, an index block, a 48-byte footer). Keys are tensor names; the empty key holds a
  ``BundleHeaderProto`` (number of shards, byte order); every other value is a
  ``BundleEntryProto`` (dtype, shape, shard, offset, size, masked CRC32C of the bytes).
* ``PREFIX.data-SSSSS-of-NNNNN``: the raw little-endian tensor bytes, back to back.

This is what ``tf.compat.v1.train.Saver`` (and so bert4keras' ``save_weights_as_checkpoint``) and
``tf.train.Checkpoint`` write. The reader checks the checksums of the index blocks and of every
tensor it reads, so truncated or corrupt files raise :class:`~rosim.errors.CheckpointError` instead
of producing wrong weights. Partitioned (sliced) variables and string tensors are listed but
cannot be read. CRC32C is computed by ``google-crc32c``'s C code when it is installed (the
``crc32c`` extra: ``pip install rosim[crc32c]``), otherwise with NumPy (many lanes at once, then
combined), which reads a base-size checkpoint in a few seconds.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from rosim.errors import CheckpointError

# --------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), as LevelDB and TensorFlow use it
# --------------------------------------------------------------------------------------------
_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8


@lru_cache(maxsize=1)
def _crc_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table[i] = c
    return table


def _apply(matrix: list[int], x: int) -> int:
    """Multiply the GF(2) 32x32 ``matrix`` (as its 32 columns) by the bit vector ``x``."""
    out, j = 0, 0
    while x:
        if x & 1:
            out ^= matrix[j]
        x >>= 1
        j += 1
    return out


@lru_cache(maxsize=64)
def _zeros_operator(n: int) -> tuple[np.ndarray, ...]:
    """Byte tables of the linear map "run the CRC register over n zero bytes".

    One step of the register is s -> T[s & 0xff] ^ (s >> 8) ^ T[byte], linear in s; n steps over
    zero bytes are that map to the n-th power (computed by repeated squaring).
    """
    table = _crc_table()
    step = [int(table[(1 << j) & 0xFF]) ^ ((1 << j) >> 8) for j in range(32)]
    result = [1 << j for j in range(32)]  # identity
    power = step
    while n:
        if n & 1:
            result = [_apply(power, c) for c in result]
        power = [_apply(power, c) for c in power]
        n >>= 1
    return tuple(
        np.array([_apply(result, b << (8 * k)) for b in range(256)], dtype=np.uint32) for k in range(4)
    )


def _register(state: int, data: np.ndarray) -> int:
    """Run the CRC register from ``state`` over ``data`` (uint8), one byte at a time."""
    table = _crc_table()
    for b in data.tolist():
        state = int(table[(state ^ b) & 0xFF]) ^ (state >> 8)
    return state


def _numpy_crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC32C of ``data`` in NumPy: what :func:`crc32c` uses without ``google-crc32c``."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
    n = buf.size
    state = 0xFFFFFFFF
    if n < 4096:
        return _register(state, buf) ^ 0xFFFFFFFF
    # K lanes of n_lane bytes each, all advanced together from a zero register; then
    # crc(A || B) = Z_|B|(crc(A)) ^ crc0(B), with Z the zero-bytes operator.
    lanes = min(1 << 16, n // 64)
    n_lane = n // lanes
    body = np.ascontiguousarray(buf[: lanes * n_lane].reshape(lanes, n_lane).T)  # (n_lane, lanes)
    table = _crc_table()
    reg = np.zeros(lanes, dtype=np.uint32)
    for row in body:
        reg = table[(reg ^ row) & 0xFF] ^ (reg >> 8)
    t0, t1, t2, t3 = (t.tolist() for t in _zeros_operator(n_lane))
    for r in reg.tolist():
        state = t0[state & 0xFF] ^ t1[(state >> 8) & 0xFF] ^ t2[(state >> 16) & 0xFF] ^ t3[state >> 24] ^ r
    return _register(state, buf[lanes * n_lane:]) ^ 0xFFFFFFFF


def _native_crc32c():
    """``google_crc32c.value`` when google-crc32c is installed with its compiled code, else None (its
    own pure-Python fallback is slower than :func:`_numpy_crc32c`, and warns when imported)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            import google_crc32c
    except ImportError:
        return None
    if getattr(google_crc32c, "implementation", None) not in ("c", "cffi"):
        return None
    return google_crc32c.value


_native = _native_crc32c()


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``), by google-crc32c when installed."""
    if _native is None:
        return _numpy_crc32c(data)
    if not isinstance(data, bytes):
        data = np.ascontiguousarray(data).view(np.uint8).tobytes() if isinstance(data, np.ndarray) else bytes(data)
    return int(_native(data))


def mask_crc(crc: int) -> int:
    """LevelDB/TensorFlow's masked CRC (stored so that CRCs of CRCs do not look like data)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# protobuf wire format (just what the bundle protos need)
# --------------------------------------------------------------------------------------------
class _Corrupt(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Corrupt("bad varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield ``(field number, value)``; value is an int (varint/fixed) or bytes (length-delimited)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + size]), pos + size
        else:
            raise _Corrupt(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise _Corrupt("field runs past the end of its message")
        yield number, value


# TensorFlow DataType enum -> (name, torch dtype, item size)
_DTYPES: dict[int, tuple[str, torch.dtype | None, int]] = {
    1: ("float32", torch.float32, 4),
    2: ("float64", torch.float64, 8),
    3: ("int32", torch.int32, 4),
    4: ("uint8", torch.uint8, 1),
    5: ("int16", torch.int16, 2),
    6: ("int8", torch.int8, 1),
    7: ("string", None, 0),
    9: ("int64", torch.int64, 8),
    10: ("bool", torch.bool, 1),
    14: ("bfloat16", torch.bfloat16, 2),
    19: ("float16", torch.float16, 2),
}

_BY_NAME = {name: (dtype, size) for name, dtype, size in _DTYPES.values()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in the data files."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int | None  # masked, as stored
    sliced: bool


def _parse_entry(name: str, value: bytes) -> TensorEntry:
    dtype, shape, shard, offset, size, crc, sliced = 0, [], 0, 0, 0, None, False
    for number, v in _fields(value):
        if number == 1:
            dtype = v
        elif number == 2:
            for n2, dim in _fields(v):
                if n2 == 2:
                    size_field = [d for n3, d in _fields(dim) if n3 == 1]
                    shape.append(size_field[0] if size_field else 0)
                elif n2 == 3 and v:
                    raise _Corrupt(f"{name}: unknown rank")
        elif number == 3:
            shard = v
        elif number == 4:
            offset = v
        elif number == 5:
            size = v
        elif number == 6:
            crc = v
        elif number == 7:
            sliced = True
    if dtype not in _DTYPES:
        raise _Corrupt(f"{name}: unsupported TensorFlow dtype enum {dtype}")
    return TensorEntry(name, _DTYPES[dtype][0], tuple(shape), shard, offset, size, crc, sliced)


# --------------------------------------------------------------------------------------------
# SSTable (LevelDB table format, uncompressed)
# --------------------------------------------------------------------------------------------
_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")
_FOOTER = 48


def _block(data: bytes, handle: bytes, what: str) -> bytes:
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + 5 > len(data):
        raise _Corrupt(f"{what} block runs past the end of the file")
    contents, kind = data[offset:end], data[end]
    if kind != 0:
        raise _Corrupt(f"{what} block is compressed (type {kind}); only uncompressed tables are supported")
    stored = int.from_bytes(data[end + 1:end + 5], "little")
    if stored != mask_crc(crc32c(data[offset:end + 1])):
        raise _Corrupt(f"{what} block checksum mismatch")
    return contents


def _entries(block: bytes):
    if len(block) < 4:
        raise _Corrupt("block too short")
    restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise _Corrupt("bad restart count")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > limit:
            raise _Corrupt("bad block entry")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + vlen]
        pos += vlen


# --------------------------------------------------------------------------------------------
# the reader
# --------------------------------------------------------------------------------------------
def resolve_prefix(path: str | os.PathLike) -> Path:
    """Turn a directory, a ``.index`` file or a prefix into the checkpoint prefix.

    In a directory, ``bert_model.ckpt`` is preferred, else the only ``*.index`` file there.
    """
    path = Path(path)
    if path.is_dir():
        preferred = path / "bert_model.ckpt"
        if Path(f"{preferred}.index").is_file():
            return preferred
        found = sorted(path.glob("*.index"))
        if len(found) == 1:
            return found[0].with_suffix("")
        if not found:
            raise CheckpointError(f"{path}: no TensorFlow checkpoint (*.index) found")
        raise CheckpointError(f"{path}: several checkpoints {[p.name for p in found]}; name one by its prefix")
    if path.suffix == ".index" and path.is_file():
        return path.with_suffix("")
    if Path(f"{path}.index").is_file():
        return path
    raise CheckpointError(f"TensorFlow checkpoint not found: {path} (expected {path}.index)")


class TFCheckpoint:
    """The tensors of a TensorFlow checkpoint, read lazily: ``names()``, ``entry(name)``, ``read(name)``."""

    def __init__(self, path: str | os.PathLike):
        self.prefix = resolve_prefix(path)
        index = Path(f"{self.prefix}.index")
        data = index.read_bytes()
        try:
            self._parse_index(data)
        except _Corrupt as exc:
            raise CheckpointError(f"{index} is truncated or corrupt: {exc}") from None

    def _parse_index(self, data: bytes) -> None:
        if len(data) < _FOOTER or data[-8:] != _MAGIC:
            raise _Corrupt("not an SSTable (bad footer magic)")
        footer = data[-_FOOTER:]
        _, pos = _varint(footer, 0)
        _, pos = _varint(footer, pos)  # metaindex handle: unused
        index_block = _block(data, footer[pos:], "index")
        self.num_shards, self.little_endian = 1, True
        self.entries: dict[str, TensorEntry] = {}
        header_seen = False
        for _, handle in _entries(index_block):
            for key, value in _entries(_block(data, handle, "data")):
                if key == b"":
                    header_seen = True
                    for number, v in _fields(value):
                        if number == 1:
                            self.num_shards = v
                        elif number == 2:
                            self.little_endian = v == 0
                    continue
                name = key.decode("utf-8", errors="replace")
                self.entries[name] = _parse_entry(name, value)
        if not header_seen:
            raise _Corrupt("no bundle header (is this a TensorFlow V2 checkpoint index?)")
        if self.num_shards < 1:
            raise _Corrupt(f"bad shard count {self.num_shards}")
        if not self.little_endian:
            raise CheckpointError(f"{self.prefix}: big-endian checkpoints are not supported")

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.prefix}: no tensor named {name!r}") from None

    def data_file(self, shard: int) -> Path:
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (checksum verified) as a torch tensor of the stored dtype."""
        e = self.entry(name)
        if e.sliced:
            raise CheckpointError(f"{name} is a partitioned (sliced) variable; re-save it unpartitioned")
        if e.dtype == "string":
            raise CheckpointError(f"{name} is a string tensor, not weights")
        torch_dtype, itemsize = _BY_NAME[e.dtype]
        numel = int(np.prod(e.shape)) if e.shape else 1
        if e.size != numel * itemsize:
            raise CheckpointError(
                f"{self.prefix}.index is corrupt: {name} has shape {e.shape} ({e.dtype}) but {e.size} bytes"
            )
        path = self.data_file(e.shard)
        if not path.is_file():
            raise CheckpointError(f"checkpoint data file not found: {path}")
        with open(path, "rb") as f:
            f.seek(e.offset)
            raw = f.read(e.size)
        if len(raw) != e.size:
            raise CheckpointError(f"{path} is truncated: {name} needs bytes {e.offset}..{e.offset + e.size}")
        if e.crc32c is not None and mask_crc(crc32c(raw)) != e.crc32c:
            raise CheckpointError(f"{path} is corrupt: checksum mismatch for {name}")
        tensor = torch.frombuffer(bytearray(raw), dtype=torch_dtype) if raw else torch.empty(0, dtype=torch_dtype)
        return tensor.reshape(e.shape)
