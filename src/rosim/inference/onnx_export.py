"""Export a rosim model's sentence encoder to ONNX (fp32, plus int8 weights), verified against PyTorch.

The exported graph is the encoder up to the model's sentence vector (the pooler on [CLS], or the
mean over the tokens when ``config.sentence_pooling == "mean"``), unnormalised, with inputs
``input_ids`` and ``attention_mask`` ``(batch, length)`` int64 (both axes dynamic) and output
``sentence_vector`` ``(batch, dim)``. Segment ids are all 0 and positions ``0..length-1``, as
:meth:`SimModel.encode` feeds them.

The directory is built in a temporary sibling and renamed into place only after the ONNX models
were checked against the PyTorch model on real Chinese sentences (one at a time, and together in a
padded batch, one of them longer than ``max_length``): the fp32 model must match within ``atol``
(max abs difference of the pooled vectors), the int8 model within ``int8_min_cosine``. A failed
export leaves nothing behind. See :mod:`rosim.inference.onnx_backend` for the layout and loading.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rosim.errors import CheckpointError, InputError, RosimError
from rosim.inference.onnx_backend import (
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAMES,
    MANIFEST_NAME,
    MODEL_FILES,
    OUTPUT_NAME,
    OnnxEncoder,
    file_sha256,
)

DEFAULT_OPSET = 17
# real sentences of different lengths (padding inside a batch), ASCII and an [UNK]-prone rare
# character, and one longer than max_length (truncation)
VERIFY_TEXTS = (
    "今天天气不错",
    "广州和深圳哪个好？",
    "一个男人在弹吉他。",
    "我想买一部新手机，有什么推荐吗",
    "北京是中国的首都，也是一座历史悠久的文化名城，每年吸引着来自世界各地的大量游客前来参观",
    "iPhone 15 的电池续航怎么样？",
    "饕餮",
    "花呗怎么还款",
    "这家餐厅的菜很好吃，服务也很周到，价格也不贵，我们下次还会再来的。" * 3,
)


class ExportVerificationError(RosimError):
    """The exported model does not reproduce the PyTorch model: nothing was written."""


class SentenceVectorModule(nn.Module):
    """What is exported: ``(input_ids, attention_mask) -> pooled``, as ``SimModel.encode`` calls the model.

    Positions come from a cumulative sum over the input (not ``arange(length)`` on a Python int, which
    tracing would freeze to the example's length).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = torch.cumsum(torch.ones_like(input_ids[:1]), dim=1) - 1
        out = self.model(input_ids, torch.zeros_like(input_ids), attention_mask, position_ids=position_ids,
                         validate=False)
        return out.pooled


def _check_out_dir(out: Path, source_dir: Path | None, overwrite: bool) -> None:
    if source_dir is not None and out.exists() and out.resolve() == source_dir.resolve():
        raise InputError("OUT is the model directory; write the ONNX export elsewhere")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise InputError(f"{out} exists and is not empty; pass --overwrite to replace it")
            if not (out / MANIFEST_NAME).is_file():
                raise InputError(f"{out} is not a rosim ONNX export: --overwrite replaces an earlier export only; "
                                 "choose a new directory")


def _torch_vectors(module: SentenceVectorModule, sim, texts) -> tuple[np.ndarray, list[dict]]:
    """Pooled vectors of ``texts`` one at a time and as one padded batch, with the numpy inputs used."""
    tok = sim.tokenizer
    rows = [tok.build_inputs(ids, None, sim.max_length)[0] for ids in tok.encode_batch_ids(list(texts))]
    feeds = [[r] for r in rows] + [rows]
    outs, arrays = [], []
    for batch in feeds:
        length = max(len(r) for r in batch)
        ids = np.full((len(batch), length), tok.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=np.int64)
        for i, r in enumerate(batch):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        with torch.no_grad():
            outs.append(module(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy())
        arrays.append({"input_ids": ids, "attention_mask": mask})
    return np.concatenate(outs), arrays


def _onnx_vectors(session, arrays: list[dict]) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT_NAME], a)[0] for a in arrays])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    nb = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (na * nb).sum(1)


def export_onnx(
    sim,
    out: str | os.PathLike,
    *,
    int8: bool = True,
    per_channel: bool = True,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
    int8_min_cosine: float = 0.98,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
    verify_texts: tuple[str, ...] | list[str] = VERIFY_TEXTS,
) -> dict:
    """Export ``sim`` (a :class:`~rosim.inference.sim_model.SimModel`) into the directory ``out``.

    Writes ``model.onnx`` (fp32), with ``int8`` also ``model.int8.onnx`` (ONNX Runtime dynamic
    quantisation of the MatMul weights, ``per_channel`` scales), ``vocab.txt``, ``config.json`` and
    ``onnx_manifest.json``; returns the manifest. Raises :class:`InputError` for a model without a
    sentence vector or an unusable ``out``, :class:`ExportVerificationError` when the ONNX model
    does not reproduce the PyTorch model (then nothing is written).
    """
    from rosim.textio import atomic_directory

    _check_exportable(sim, opset, verify_texts)
    ort = _onnxruntime()
    out = Path(out)
    _check_out_dir(out, None if source_dir is None else Path(source_dir), overwrite)
    model = sim.model
    if model.device.type != "cpu" or any(p.dtype != torch.float32 for p in model.parameters()):
        import copy

        model = copy.deepcopy(model).to("cpu").float()  # export a CPU fp32 copy; the caller's model is untouched
    module = SentenceVectorModule(model).eval()
    ref, arrays = _torch_vectors(module, sim, verify_texts)
    verification: dict = {"texts": len(verify_texts), "batches": len(arrays)}

    with atomic_directory(out) as tmp:
        _export_fp32(module, arrays[-1], tmp / MODEL_FILES["fp32"], opset, sim.name)
        got = _onnx_vectors(_session(ort, tmp / MODEL_FILES["fp32"]), arrays)
        diff = float(np.abs(got - ref).max())
        verification["fp32_max_abs_diff"] = diff
        verification["fp32_min_cosine"] = float(_cosines(got, ref).min())
        if not diff <= atol:  # also catches NaN
            raise ExportVerificationError(
                f"the ONNX model differs from the PyTorch model by {diff:.3g} (max abs, pooled vectors; limit "
                f"{atol:g}): not exported. Please report this with the model's config.json")
        files = [MODEL_FILES["fp32"]]
        if int8:
            _quantize_int8(tmp / MODEL_FILES["fp32"], tmp / MODEL_FILES["int8"], per_channel)
            cos = _cosines(_onnx_vectors(_session(ort, tmp / MODEL_FILES["int8"]), arrays), ref)
            verification["int8_min_cosine"] = float(cos.min())
            verification["int8_mean_cosine"] = float(cos.mean())
            if not cos.min() >= int8_min_cosine:
                raise ExportVerificationError(
                    f"the int8 model's vectors have cosine {cos.min():.4f} with the PyTorch model's (limit "
                    f"{int8_min_cosine}): not exported; export without --int8, or lower --int8-min-cosine")
            files.append(MODEL_FILES["int8"])
        sim.tokenizer.save(tmp / "vocab.txt")
        (tmp / "config.json").write_text(model.config.to_json(), encoding="utf-8")
        files += ["vocab.txt", "config.json"]
        manifest = _manifest(sim, model.config, opset, per_channel if int8 else None, verification,
                             {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)} for f in files})
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        try:  # the directory loads as a whole (manifest, checksums, tokenizer, inputs) before it is renamed in
            for precision in ("fp32", "int8") if int8 else ("fp32",):
                OnnxEncoder(tmp, precision=precision)
        except CheckpointError as exc:
            raise ExportVerificationError(f"the export does not load back: {exc}") from None
    return manifest


def _check_exportable(sim, opset: int, verify_texts) -> None:
    if not sim.model.has_sentence_vector:
        raise InputError(
            f"{sim.name} has no sentence vector to export: it has no pooler (config.with_pooler=false) and "
            "config.sentence_pooling is 'pooler'; convert it with its pooler (rosim convert without "
            "--allow-missing pooler), or set sentence_pooling to 'mean' in its config.json"
        )
    if opset < 14:
        raise InputError(f"opset must be at least 14 (scaled dot-product attention), got {opset}")
    if not verify_texts:
        raise InputError("verify_texts must hold at least one text")


def _onnxruntime():
    try:
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401  (the int8 step needs it; fail before any work)
    except ImportError:
        raise InputError("exporting to ONNX needs onnx and onnxruntime: pip install 'rosim[onnx]'") from None
    return onnxruntime


def _session(ort, path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export_fp32(module: torch.nn.Module, example: dict, path: Path, opset: int, name: str) -> None:
    """``torch.onnx.export`` (TorchScript) with dynamic batch and length axes."""
    args = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notices
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=opset,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                              OUTPUT_NAME: {0: "batch"}},
            )
        except Exception as exc:
            raise RosimError(f"torch.onnx.export failed for {name}: {exc}") from exc


def _quantize_int8(fp32_path: Path, int8_path: Path, per_channel: bool) -> None:
    """ONNX Runtime's dynamic quantisation of the MatMul weights (QInt8), helper files kept out of the export."""
    import logging
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    qdir = int8_path.parent / ".quantize"
    qdir.mkdir()
    logger = logging.getLogger()
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.setLevel(logging.ERROR)  # "consider pre-processing" notices on the root logger
        try:
            quantize_dynamic(fp32_path, qdir / "q.onnx", weight_type=QuantType.QInt8,
                             per_channel=per_channel, op_types_to_quantize=["MatMul"])
        finally:
            logger.setLevel(level)
    os.replace(qdir / "q.onnx", int8_path)
    shutil.rmtree(qdir)


def _manifest(sim, cfg, opset: int, per_channel: bool | None, verification: dict, files: dict) -> dict:
    """What ``onnx_manifest.json`` records: the source's identity, the graph's interface, how it was made."""
    import onnxruntime

    identity = sim.identity()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {"name": identity["name"], "fingerprint": identity["fingerprint"], "weights": identity["weights"]},
        "dim": cfg.hidden_size,
        "max_length": sim.max_length,
        "vocab_size": cfg.vocab_size,
        "pooling": cfg.sentence_pooling,
        "pooler_activation": cfg.pooler_activation if cfg.sentence_pooling == "pooler" else None,
        "normalized": False,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "opset": opset,
        "exporter": f"torch.onnx.export (TorchScript), torch {torch.__version__}",
        "onnxruntime": onnxruntime.__version__,
        "int8": ({"method": "onnxruntime.quantization.quantize_dynamic", "weights": "QInt8", "ops": ["MatMul"],
                  "per_channel": per_channel} if per_channel is not None else None),
        "verification": verification,
        "files": files,
    }
