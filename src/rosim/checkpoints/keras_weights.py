"""Weights saved by Keras ``model.save_weights`` from bert4keras models (the official training scripts).

roformer-sim's and simbert's training scripts save with Keras 2 ``model.save_weights(path)``, in
one of two layouts, neither with the Google BERT names of a release checkpoint:

* **TF format** (``path`` without ``.h5``): a TensorFlow checkpoint whose keys are object-graph
  paths, ``layer_with_weights-3/q_dense/kernel/.ATTRIBUTES/VARIABLE_VALUE``. Its
  ``_CHECKPOINTABLE_OBJECT_GRAPH`` tensor (a ``TrackableObjectGraph`` protobuf) gives each key the
  variable's full name, ``Transformer-0-MultiHeadSelfAttention/dense/kernel``: the Keras layer.
* **HDF5** (``path.h5``): one group per layer named like the layer, whose ``weight_names``
  attribute lists its variables in ``layer.weights`` order.

Both are read here into the bert4keras release names (``bert/encoder/layer_0/attention/self/
query/kernel``, …) by the layer names bert4keras gives (``Embedding-Token``,
``Transformer-{i}-MultiHeadSelfAttention``, ``Pooler-Dense``, ``MLM-Bias``, …), so
:func:`rosim.checkpoints.bert4keras.import_bert4keras` converts them as it converts a release.
Inside the attention layer the four projections are told apart by their attribute names in the TF
format (``q_dense``, ``k_dense``, ``v_dense``, ``o_dense``) and by their order (q, k, v, o, as
bert4keras builds them) in HDF5. Layers that are not part of the model (a classifier head
trained on top) are listed as ignored. No TensorFlow needed: the TF format is read by
:mod:`rosim.checkpoints.tf_bundle`, HDF5 by ``h5py``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rosim.checkpoints.tf_bundle import TFCheckpoint, _Corrupt, _fields, _varint, crc32c, mask_crc
from rosim.errors import CheckpointError

_NORM = {"gamma": "gamma", "beta": "beta"}
_DENSE = {"kernel": "kernel", "bias": "bias"}
_ATTENTION = ("q_dense", "k_dense", "v_dense", "o_dense")
_ATTENTION_SCOPE = {"q_dense": "attention/self/query", "k_dense": "attention/self/key",
                    "v_dense": "attention/self/value", "o_dense": "attention/output/dense"}
_FFN_SCOPE = {"i0_dense": "intermediate/dense", "i_dense": "intermediate/dense", "o_dense": "output/dense"}


def release_name(layer: str, role: str) -> str | None:
    """The bert4keras release variable for weight ``role`` of Keras layer ``layer`` (None: not the model's).

    ``role`` is the path inside the layer: ``kernel``, ``gamma``, ``embeddings``, ``q_dense/kernel``…
    """
    leaf = role.rsplit("/", 1)[-1]
    fixed = {
        "Embedding-Token": "bert/embeddings/word_embeddings",
        "Embedding-Segment": "bert/embeddings/token_type_embeddings",
        "Embedding-Position": "bert/embeddings/position_embeddings",
        "MLM-Bias": "cls/predictions/output_bias",
    }
    if layer in fixed:
        return fixed[layer]
    scoped = {"Embedding-Norm": "bert/embeddings/LayerNorm", "Pooler-Dense": "bert/pooler/dense",
              "MLM-Dense": "cls/predictions/transform/dense", "MLM-Norm": "cls/predictions/transform/LayerNorm"}
    if layer in scoped and leaf in (_NORM if layer.endswith("Norm") else _DENSE):
        return f"{scoped[layer]}/{leaf}"
    m = re.fullmatch(r"Transformer-(\d+)-(MultiHeadSelfAttention|FeedForward)(-Norm)?", layer)
    if not m:
        return None
    base = f"bert/encoder/layer_{m[1]}"
    if m[3]:
        scope = "attention/output/LayerNorm" if m[2] == "MultiHeadSelfAttention" else "output/LayerNorm"
        return f"{base}/{scope}/{leaf}" if leaf in _NORM else None
    parts = role.split("/")
    table = _ATTENTION_SCOPE if m[2] == "MultiHeadSelfAttention" else _FFN_SCOPE
    if len(parts) == 2 and parts[0] in table and leaf in _DENSE:
        return f"{base}/{table[parts[0]]}/{leaf}"
    return None


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]


class KerasWeights:
    """A Keras ``save_weights`` file seen through the bert4keras release names: ``names()``,
    ``entry(name)`` (dtype, shape), ``read(name)`` — the interface of :class:`TFCheckpoint`."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.source = str(path)
        self._arrays: dict[str, object] = {}  # release name -> loader
        self._entries: dict[str, _Entry] = {}
        self.ignored: list[str] = []
        if is_hdf5(path):
            self._read_hdf5(path)
        else:
            self._read_tf(path)
        if not self._entries:
            raise CheckpointError(f"{path}: Keras weights without any bert4keras layer (Embedding-Token, "
                                  f"Transformer-0-…); layers found: {self.ignored[:5]}")

    def _add(self, layer: str, role: str, dtype: str, shape: tuple[int, ...], load) -> None:
        name = release_name(layer, role)
        if name is None:
            self.ignored.append(f"{layer}/{role}")
            return
        if name in self._entries:
            raise CheckpointError(f"{self.source}: two weights map to {name} ({layer}/{role})")
        self._entries[name] = _Entry(name, dtype, shape)
        self._arrays[name] = load

    # ------------------------------------------------------------------ TF format
    def _read_tf(self, path: Path) -> None:
        ckpt = TFCheckpoint(path)
        self.source = str(ckpt.prefix)
        graph = object_graph_names(ckpt)
        if not graph:
            raise CheckpointError(f"{ckpt.prefix}: not a Keras save_weights checkpoint (no object graph)")
        for key, full_name in graph.items():
            if key not in ckpt:
                raise CheckpointError(f"{ckpt.prefix}: the object graph names {key}, which the checkpoint lacks")
            layer = full_name.split("/", 1)[0]
            inner = key.split("/", 1)[1].removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")  # q_dense/kernel
            e = ckpt.entry(key)
            self._add(layer, inner, e.dtype, e.shape, lambda key=key: ckpt.read(key))

    # ------------------------------------------------------------------ HDF5
    def _read_hdf5(self, path: Path) -> None:
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise CheckpointError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {exc}") from None
        self._h5 = f
        root = f["model_weights"] if "model_weights" in f else f  # model.save() files nest the weights
        if "layer_names" not in root.attrs:
            raise CheckpointError(f"{path}: an HDF5 file without Keras layer_names: not written by save_weights")
        for raw_layer in root.attrs["layer_names"]:
            layer = _text(raw_layer)
            group = root[layer]
            names = [_text(w) for w in group.attrs.get("weight_names", [])]
            roles = _hdf5_roles(layer, names)
            for weight, role in zip(names, roles, strict=True):
                ds = group[weight]
                self._add(layer, role, str(ds.dtype), tuple(ds.shape),
                          lambda ds=ds: torch.from_numpy(np.asarray(ds[()])))

    # ------------------------------------------------------------------ the TFCheckpoint interface
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> _Entry:
        return self._entries[name]

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._arrays[name]()
        except OSError as exc:  # h5py on a truncated file
            raise CheckpointError(f"{self.source}: cannot read {name} (truncated or corrupt?): {exc}") from None


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _hdf5_roles(layer: str, weight_names: list[str]) -> list[str]:
    """Roles of an HDF5 layer's weights: the leaf (``kernel``) or, inside the attention and
    feed-forward layers, ``q_dense/kernel``… by order, as bert4keras creates the projections."""
    leaves = [w.rsplit("/", 1)[-1].split(":", 1)[0] for w in weight_names]
    m = re.fullmatch(r"Transformer-\d+-(MultiHeadSelfAttention|FeedForward)", layer)
    if not m:
        return leaves
    dense = _ATTENTION if m[1] == "MultiHeadSelfAttention" else ("i0_dense", "o_dense")
    if leaves != ["kernel", "bias"] * len(dense):
        raise CheckpointError(f"layer {layer}: expected {len(dense)} kernel/bias pairs, found {weight_names}")
    return [f"{dense[i // 2]}/{leaf}" for i, leaf in enumerate(leaves)]


def is_hdf5(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def object_graph_names(ckpt: TFCheckpoint) -> dict[str, str]:
    """``checkpoint key -> variable full name`` from the checkpoint's ``_CHECKPOINTABLE_OBJECT_GRAPH``.

    The tensor is a scalar string: ``varint length``, the masked CRC32C of the length (as uint32),
    then the serialised ``TrackableObjectGraph`` (nodes = field 1; a node's attributes = field 2, each a
    ``SerializedTensor`` with name 1, full_name 2, checkpoint_key 3).
    """
    name = "_CHECKPOINTABLE_OBJECT_GRAPH"
    if name not in ckpt:
        return {}
    e = ckpt.entry(name)
    with open(ckpt.data_file(e.shard), "rb") as f:
        f.seek(e.offset)
        raw = f.read(e.size)
    try:
        if len(raw) != e.size:
            raise _Corrupt("the object graph is cut short")
        length, pos = _varint(raw, 0)
        graph = raw[pos + 4:pos + 4 + length]
        if len(graph) != length:
            raise _Corrupt("the object graph is shorter than its length")
        # TensorFlow's checksum of a string tensor: each length as uint32, their masked CRC, the bytes
        if e.crc32c is not None and mask_crc(crc32c(length.to_bytes(4, "little") + raw[pos:pos + 4] + graph)) != e.crc32c:
            raise _Corrupt("checksum mismatch for the object graph")
        out = {}
        for field, node in _fields(graph):
            if field != 1:
                continue
            for sub, attr in _fields(node):
                if sub == 2:
                    values = dict(_fields(attr))
                    if 2 in values and 3 in values:
                        out[values[3].decode("utf-8")] = values[2].decode("utf-8")
        return out
    except (_Corrupt, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{ckpt.prefix}: the Keras object graph is corrupt: {exc}") from None
