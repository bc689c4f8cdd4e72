"""Sentence vectors on ONNX Runtime, without PyTorch: :class:`OnnxEncoder`.

It loads a directory written by :func:`rosim.inference.onnx_export.export_onnx` (``rosim export
onnx``)::

    model.onnx           the encoder up to the sentence vector (fp32), inputs input_ids, attention_mask
    model.int8.onnx      the same with int8 weights (dynamic quantisation), when exported with int8
    config.json          the source model's config (for reference)
    vocab.txt            the tokenizer's vocabulary
    onnx_manifest.json   what was exported: the source model's identity, opset, pooling, max_length,
                         dims, and the size + SHA-256 of every file, checked at load

``encode`` / ``similarity`` follow :class:`~rosim.inference.sim_model.SimModel` (same tokenizer,
truncation to ``max_length``, length-sorted batches, L2 normalisation); ``identity()`` is the
source model's, so an index built with the PyTorch model is searched with its export, and an
index built with another model is refused. This module never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from rosim.errors import CheckpointError, InputError
from rosim.inference import common
from rosim.inference.common import check_not_blank, check_texts, progress

MANIFEST_NAME = "onnx_manifest.json"
FORMAT = "rosim-onnx"
FORMAT_VERSION = 1
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_vector"
Precision = Literal["fp32", "int8"]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise InputError("the ONNX backend needs onnxruntime: pip install 'rosim[onnx]' "
                         "(or use --backend torch)") from None
    return onnxruntime


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an ONNX export directory, checked for format and required keys."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "not found" if not directory.exists() else "a file, not a directory"
        raise CheckpointError(f"ONNX export {directory} is {what}; make one with `rosim export onnx MODEL_DIR OUT`")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        hint = (" (it is a PyTorch checkpoint: use --backend torch, or export it with `rosim export onnx`)"
                if (directory / "model.safetensors").is_file() else "")
        raise CheckpointError(f"{directory} is not a rosim ONNX export: {MANIFEST_NAME} not found{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): the export is corrupt; export it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {manifest.get('format_version')!r}; this rosim reads "
                              f"{FORMAT_VERSION}: export the model again with this version")
    missing = [k for k in ("source", "files", "dim", "max_length", "vocab_size", "pooling") if k not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: the export is corrupt; export it again")
    return manifest


class OnnxEncoder:
    """A rosim sentence encoder exported to ONNX, run by ONNX Runtime on the CPU.

    ``precision`` picks ``model.onnx`` (fp32, matches PyTorch to ~1e-6) or ``model.int8.onnx``
    (int8 weights: faster, slightly different vectors). ``threads`` sets ONNX Runtime's intra-op
    threads (default: its own choice, one per physical core). ``verify`` checks every file's
    SHA-256 against the manifest (a mismatched or corrupt file is refused).
    """

    def __init__(self, directory: str | os.PathLike, *, precision: Precision = "fp32", threads: int | None = None,
                 verify: bool = True):
        if precision not in MODEL_FILES:
            raise InputError(f"precision must be 'fp32' or 'int8', got {precision!r}")
        if threads is not None and (not isinstance(threads, int) or threads <= 0):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        directory = Path(directory)
        manifest = read_manifest(directory)
        self.directory, self.manifest, self.precision = directory, manifest, precision
        files = manifest["files"]
        name = MODEL_FILES[precision]
        if name not in files:
            raise CheckpointError(f"{directory} has no {precision} model ({name} is not in its manifest); "
                                  f"export it with --int8, or use the fp32 model")
        for fname in (name, "vocab.txt"):
            self._check_file(fname, files.get(fname), verify)
        from rosim.tokenization.tokenizer import CharTokenizer

        try:
            self.tokenizer = CharTokenizer.from_file(directory / "vocab.txt")
        except (InputError, FileNotFoundError) as exc:
            raise CheckpointError(f"{directory}: {exc}") from None
        if len(self.tokenizer) != manifest["vocab_size"]:
            raise CheckpointError(f"{directory}: vocab.txt has {len(self.tokenizer)} tokens, the manifest says "
                                  f"{manifest['vocab_size']}: the files do not belong together; export again")
        self.max_length = int(manifest["max_length"])
        self.dim = int(manifest["dim"])
        self.session = self._session(directory / name, threads)
        self.threads = threads

    # ------------------------------------------------------------------ loading
    def _check_file(self, fname: str, entry: dict | None, verify: bool) -> None:
        path = self.directory / fname
        if entry is None:
            raise CheckpointError(f"{self.directory / MANIFEST_NAME} does not list {fname}: the export is corrupt")
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the export is incomplete; export it again")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {entry.get('bytes')}: the file is "
                                  "truncated, corrupt or from another export; export it again")
        if verify and file_sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} does not match the SHA-256 in {MANIFEST_NAME}: the file is corrupt or "
                                  "from another export; export it again")

    def _session(self, path: Path, threads: int | None):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; ORT's warnings are not the user's business
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path} is not a loadable ONNX model ({first}): export it again") from None
        inputs = tuple(i.name for i in session.get_inputs())
        outputs = session.get_outputs()
        if inputs != INPUT_NAMES or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise CheckpointError(f"{path} has inputs {list(inputs)} and outputs {[o.name for o in outputs]}; a rosim "
                                  f"export has {list(INPUT_NAMES)} -> [{OUTPUT_NAME!r}]: export the model again")
        shape = outputs[0].shape
        if len(shape) != 2 or shape[1] != self.manifest["dim"]:
            raise CheckpointError(f"{path} makes vectors of shape {shape}, the manifest says dim "
                                  f"{self.manifest['dim']}: the files do not belong together; export again")
        return session

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> OnnxEncoder:
        return cls(directory, **kwargs)

    # ------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        return str(self.manifest["source"].get("name", self.directory))

    def identity(self) -> dict:
        """The source model's identity (as ``SimModel.identity()`` gave it at export)."""
        src = self.manifest["source"]
        return {"name": self.name, **{k: src[k] for k in ("fingerprint", "weights") if k in src},
                "dim": self.dim, "max_length": self.max_length}

    def __repr__(self) -> str:
        return f"OnnxEncoder({str(self.directory)!r}, precision={self.precision!r}, source={self.name!r})"

    # ------------------------------------------------------------------ encoding
    def _batch_arrays(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), self.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, texts: str | Sequence[str], *, batch_size: int = 64, normalize: bool = True,
               pooling: str | None = "pooler", show_progress_bar: bool | None = None,
               convert_to: Literal["numpy", "torch"] = "numpy"):
        """Sentence vectors ``(n, dim)`` (or ``(dim,)`` for one string), as ``SimModel.encode`` makes them.

        Only the model's sentence vector (``pooling="pooler"``) is exported; the other poolings need
        the PyTorch model (``--backend torch``).
        """
        items, single = check_texts(texts)
        if pooling not in (None, "pooler"):
            raise InputError(f"the ONNX export holds the model's sentence vector only (pooling 'pooler'), not "
                             f"{pooling!r}; use the PyTorch model (--backend torch) for other poolings")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        if convert_to not in ("numpy", "torch"):
            raise InputError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        check_not_blank(items)
        tok = self.tokenizer
        ids = tok.encode_batch_ids(items)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        for batch in progress(batches, len(batches), show_progress_bar, "encode (onnx)"):
            rows = [tok.build_inputs(ids[i], None, self.max_length)[0] for i in batch]
            out[batch] = self.session.run([OUTPUT_NAME], self._batch_arrays(rows))[0]
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # as torch's F.normalize
        out = out[0] if single else out
        if convert_to == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(out))
        return out

    def similarity(self, a: str | Sequence[str], b: str | Sequence[str], *, batch_size: int = 64):
        """Cosine similarity, as ``SimModel.similarity``: a float, a vector or the matrix, by argument forms."""
        return common.similarity(self.encode, a, b, batch_size=batch_size)

    def similarity_pairwise(self, a: Sequence[str], b: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """One cosine per pair ``(a[i], b[i])``, as ``SimModel.similarity_pairwise``."""
        return common.similarity_pairwise(self.encode, a, b, batch_size=batch_size)
