"""CRC32C of the TF checkpoint reader: google-crc32c's C code when installed, rosim's NumPy code
otherwise; both give the same values and both catch a corrupt block."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from rosim.checkpoints import tf_bundle
from rosim.checkpoints.bert4keras import import_bert4keras
from rosim.checkpoints.tf_bundle import TFCheckpoint, crc32c
from rosim.errors import CheckpointError
from tests.checkpoints.fixtures import write_bert4keras_dir
from tests.helpers import tiny_model

# RFC 3720 appendix B.4 and the usual check value
VECTORS = [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


def _fake_module(implementation: str, calls: list) -> types.ModuleType:
    """A stand-in for google_crc32c (not installed here): its value() computes with rosim's code and
    records what it was given, so the dispatch and the conversions are what is tested."""
    module = types.ModuleType("google_crc32c")
    module.implementation = implementation

    def value(chunk):
        calls.append(type(chunk))
        if not isinstance(chunk, bytes):
            raise TypeError("the fake takes bytes only")
        return tf_bundle._numpy_crc32c(chunk)

    module.value = value
    return module


@pytest.fixture(params=["numpy", "fake", "google-crc32c"])
def path(request, monkeypatch):
    calls: list = []
    if request.param == "numpy":
        monkeypatch.setattr(tf_bundle, "_native", None)
    elif request.param == "fake":
        monkeypatch.setattr(tf_bundle, "_native", _fake_module("c", calls).value)
    else:
        real = tf_bundle._native_crc32c()
        if real is None:
            pytest.skip("google-crc32c (with its C code) is not installed: pip install rosim[crc32c]")
        monkeypatch.setattr(tf_bundle, "_native", real)
    return request.param, calls


def test_known_vectors_on_every_path(path):
    name, calls = path
    for data, expected in VECTORS:
        assert crc32c(data) == expected, (name, data)
        assert crc32c(bytearray(data)) == crc32c(memoryview(data)) == crc32c(np.frombuffer(data, np.uint8)) == expected
    big = np.random.default_rng(0).integers(0, 256, 200_003, dtype=np.uint8)
    assert crc32c(big) == tf_bundle._register(0xFFFFFFFF, big) ^ 0xFFFFFFFF
    assert crc32c(big.view(np.int8)[::-1].copy()) == crc32c(big[::-1].tobytes())
    if name == "fake":
        assert calls and set(calls) == {bytes}  # every input reaches the library as bytes


def test_numpy_code_is_the_byte_at_a_time_definition():
    for n in (0, 1, 4095, 4096, 4097, 70_001):
        data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
        assert tf_bundle._numpy_crc32c(data) == tf_bundle._register(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def test_which_implementation_is_used(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "google_crc32c", _fake_module("c", calls))
    assert tf_bundle._native_crc32c() is sys.modules["google_crc32c"].value
    monkeypatch.setitem(sys.modules, "google_crc32c", _fake_module("cffi", calls))
    assert tf_bundle._native_crc32c() is sys.modules["google_crc32c"].value
    # google-crc32c's own pure-Python fallback is slower than the NumPy code: not used
    monkeypatch.setitem(sys.modules, "google_crc32c", _fake_module("python", calls))
    assert tf_bundle._native_crc32c() is None
    monkeypatch.setitem(sys.modules, "google_crc32c", None)  # not installed: import raises ImportError
    assert tf_bundle._native_crc32c() is None


def test_a_corrupt_block_is_detected_on_every_path(path, tmp_path):
    model, tok = tiny_model()
    d = write_bert4keras_dir(tmp_path / "c", model, tok)
    import_bert4keras(d)  # the untouched checkpoint reads
    data = d / "bert_model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is corrupt: checksum mismatch for"):
        import_bert4keras(d)
    index = d / "bert_model.ckpt.index"
    idx = bytearray(index.read_bytes())
    idx[20] ^= 0x01
    index.write_bytes(bytes(idx))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        TFCheckpoint(d)
