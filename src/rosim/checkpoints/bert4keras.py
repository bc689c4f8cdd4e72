"""Importer for the original bert4keras TensorFlow checkpoints of RoFormer-Sim and SimBERT.

A release directory (e.g. ``chinese_roformer-sim-char-ft_L-6_H-384_A-6``) holds
``bert_config.json``, ``vocab.txt`` and ``bert_model.ckpt.{index,data-00000-of-00001}``. The
variable names are those of bert4keras 0.10.6 ``BERT.variable_mapping`` (which ``NEZHA`` and
``RoFormer`` inherit unchanged): the Google BERT names, ``bert/...`` for the encoder and pooler and
``cls/predictions/...`` for the MLM head. ``model='roformer'`` has no position table (rotary
positions carry no weights); ``model='bert'`` (SimBERT v1) has ``bert/embeddings/position_embeddings``.
The variant is detected from that tensor unless given.

TensorFlow Dense kernels are stored ``(in, out)``; torch ``Linear`` weights are ``(out, in)``, so
every kernel is transposed. The MLM output layer is the token embedding matrix itself (tied), so
the checkpoint has only its bias, ``cls/predictions/output_bias``.

The checkpoint is read by :mod:`rosim.checkpoints.tf_bundle` (pure Python + NumPy); TensorFlow is
not needed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import torch

from rosim.checkpoints.hf import config_from_hf
from rosim.checkpoints.io import LoadReport, build_model, read_json_object
from rosim.checkpoints.tf_bundle import TFCheckpoint, resolve_prefix
from rosim.errors import CheckpointError, InputError
from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
from rosim.tokenization.tokenizer import CharTokenizer

# rosim module (inside one layer) -> TF scope under bert/encoder/layer_N/
_LAYER = {
    "attention.query": "attention/self/query",
    "attention.key": "attention/self/key",
    "attention.value": "attention/self/value",
    "attention.output": "attention/output/dense",
    "attention_norm": "attention/output/LayerNorm",
    "intermediate": "intermediate/dense",
    "ffn_output": "output/dense",
    "ffn_norm": "output/LayerNorm",
}
# rosim module (outside the layers) -> TF scope
_OUTER = {
    "embeddings.layer_norm": "bert/embeddings/LayerNorm",
    "pooler": "bert/pooler/dense",
    "lm_head.dense": "cls/predictions/transform/dense",
    "lm_head.layer_norm": "cls/predictions/transform/LayerNorm",
}
# tensors that are a whole variable (no kernel/bias split)
_WHOLE = {
    "embeddings.word_embeddings.weight": "bert/embeddings/word_embeddings",
    "embeddings.token_type_embeddings.weight": "bert/embeddings/token_type_embeddings",
    "embeddings.position_embeddings.weight": "bert/embeddings/position_embeddings",
    "lm_head.bias": "cls/predictions/output_bias",
}
# variables in a checkpoint that are not model weights, or belong to heads rosim has no use for;
# they are skipped and listed in the LoadReport as ignored
_IGNORABLE = re.compile(
    r"^(global_step|bad_steps|good_steps|loss_scale|_CHECKPOINTABLE_OBJECT_GRAPH"
    r"|cls/seq_relationship/.*"  # next-sentence-prediction head
    r"|.*/(adam_m|adam_v|Adam|Adam_1|AdamWeightDecay|AdamWeightDecay_1|Momentum|accumulator)(_\d+)?)$"
)


def tf_names(config: RoFormerSimConfig) -> dict[str, tuple[str, bool]]:
    """Map every rosim tensor name to ``(bert4keras variable name, transpose?)``."""
    out: dict[str, tuple[str, bool]] = {}
    with torch.device("meta"):  # names only: allocate nothing
        names = list(RoFormerSim(config).state_dict())
    for name in names:
        if name in _WHOLE:
            out[name] = (_WHOLE[name], False)
            continue
        module, leaf = name.rsplit(".", 1)
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
        scope = f"bert/encoder/layer_{match[1]}/{_LAYER[match[2]]}" if match else _OUTER[module]
        if scope.endswith("LayerNorm"):
            out[name] = (f"{scope}/{'gamma' if leaf == 'weight' else 'beta'}", False)
        else:  # Dense: kernel (in, out) -> weight (out, in)
            out[name] = (f"{scope}/{'kernel' if leaf == 'weight' else 'bias'}", leaf == "weight")
    return out


def _find_file(directory: Path, names: tuple[str, ...], what: str) -> Path:
    for n in names:
        if (directory / n).is_file():
            return directory / n
    raise CheckpointError(f"{directory}: {what} not found (looked for {', '.join(names)})")


def import_bert4keras(
    path: str | os.PathLike,
    *,
    model: Literal["auto", "roformer", "bert"] = "auto",
    allow_missing=(),
    pooler_activation: Literal["linear", "tanh"] = "linear",
) -> tuple[RoFormerSim, CharTokenizer, LoadReport]:
    """Import a bert4keras checkpoint directory (or checkpoint prefix) into a rosim model.

    ``model`` picks RoFormer (rotary) or BERT (absolute positions); "auto" decides by whether the
    checkpoint has a position table. ``pooler_activation`` is not recorded in the checkpoint:
    RoFormer-Sim and SimBERT were trained with ``with_pool='linear'``. A checkpoint without the
    MLM head gives a model without an LM head (reported); one without a pooler is an error unless
    ``allow_missing=('pooler.',)``.
    """
    path = Path(path)
    if not path.exists() and not Path(f"{path}.index").is_file():
        raise CheckpointError(f"bert4keras checkpoint not found: {path}")
    ckpt, directory, source, kind = open_variables(path)
    config, cfg_path, model = _read_config(directory, kind, model, "bert/embeddings/position_embeddings" in ckpt,
                                           pooler_activation)
    tokenizer = _read_tokenizer(directory, config, cfg_path)

    notes = []
    if not any(n.startswith("cls/predictions/") for n in ckpt.names()):
        config.with_lm_head = False
        notes.append("the checkpoint has no MLM head (cls/predictions/*): the model cannot generate")
    allow_missing = tuple(allow_missing)
    if "bert/pooler/dense/kernel" not in ckpt and not any(str(p).startswith("pooler") for p in allow_missing):
        raise CheckpointError(
            f"{source}: the checkpoint has no pooler (bert/pooler/dense/*); RoFormer-Sim's sentence vector is "
            "the pooler output. Pass allow_missing=('pooler.',) (CLI: --allow-missing pooler) to initialise "
            "it randomly on purpose."
        )
    config.extra = {**config.extra, "imported_from": "bert4keras", "bert4keras_model": model}
    if kind != "release":
        config.extra["bert4keras_file"] = kind
        notes.append(f"read Keras save_weights ({kind}) by bert4keras layer names")

    state, ignored = _read_state(ckpt, config, allow_missing, source, cfg_path)
    result, report = build_model(config, state, allow_missing=allow_missing, source=source)
    report.ignored = sorted(set(report.ignored) | set(ignored))
    report.notes = [*report.notes, *notes]
    return result.eval(), tokenizer, report


def _read_config(directory: Path, kind: str, model: str, has_positions: bool, pooler_activation: str):
    """``(config, its path, "roformer" or "bert")`` from ``bert_config.json`` ("auto" decides by whether
    the checkpoint has a position table)."""
    cfg_path = _find_file(directory, ("bert_config.json", "config.json"), "the model config (bert_config.json)"
                          + ("; Keras save_weights files hold weights only: put the bert_config.json and vocab.txt "
                             "of the model you trained beside them" if kind != "release" else ""))
    data = read_json_object(cfg_path)
    from rosim.checkpoints.detect import refuse_roformer_v2

    refuse_roformer_v2(cfg_path, data)
    if data.get("embedding_size", data.get("hidden_size")) != data.get("hidden_size"):
        raise CheckpointError(f"{cfg_path}: embedding_size != hidden_size (Embedding-Mapping) is not supported")
    if model == "auto":
        model = "bert" if has_positions else "roformer"
    if model not in ("roformer", "bert"):
        raise CheckpointError(f"model must be 'auto', 'roformer' or 'bert', got {model!r}")
    try:
        config = config_from_hf(data, variant=model)
        config.attention_dropout = 0.0  # bert4keras 0.10.6 has no attention-probability dropout
        config.pooler_activation = pooler_activation
        config.__post_init__()
    except InputError as exc:  # includes CheckpointError
        raise CheckpointError(f"{cfg_path}: {exc}") from None
    return config, cfg_path, model


def _read_tokenizer(directory: Path, config, cfg_path: Path) -> CharTokenizer:
    vocab_path = _find_file(directory, ("vocab.txt",), "vocab.txt")
    try:
        tokenizer = CharTokenizer.from_file(vocab_path)
    except ValueError as exc:
        raise CheckpointError(f"{vocab_path}: {exc}") from None
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(f"{vocab_path} has {len(tokenizer)} tokens but {cfg_path.name} says {config.vocab_size}")
    return tokenizer


def _read_state(ckpt, config, allow_missing: tuple, source, cfg_path: Path) -> tuple[dict[str, torch.Tensor], list]:
    """Our state dict from the checkpoint's variables (transposed where TF stores kernels (in, out)),
    after checking that none is unexpected or missing and every shape matches the config; also the
    variables left out on purpose."""
    names = tf_names(config)
    wanted = {tf: ours for ours, (tf, _) in names.items()}
    unexpected = [n for n in ckpt.names() if n not in wanted and not _IGNORABLE.match(n)]
    if unexpected:
        hint = ""
        if "bert/embeddings/position_embeddings" in unexpected:
            hint = " (a position table means a BERT checkpoint: use model='bert'; CLI: --model bert)"
        raise CheckpointError(f"{source}: unexpected variables {unexpected}{hint}")
    ignored = [n for n in ckpt.names() if n not in wanted] + list(getattr(ckpt, "ignored", []))
    missing = [tf for ours, (tf, _) in names.items() if tf not in ckpt and not _allowed(ours, allow_missing)]
    if missing:
        raise CheckpointError(
            f"{source}: missing variables {missing}"
            + (" (no position table: is this a RoFormer checkpoint? use model='roformer'; CLI: --model roformer)"
               if "bert/embeddings/position_embeddings" in missing else "")
        )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RoFormerSim(config).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    mismatches = []
    for ours, (tf, transpose) in names.items():
        if tf not in ckpt:
            continue
        entry = ckpt.entry(tf)
        stored = tuple(reversed(expected[ours])) if transpose else expected[ours]
        if entry.shape != stored:
            mismatches.append(f"{tf}: checkpoint {entry.shape} vs config {stored}")
            continue
        if entry.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise CheckpointError(f"{source}: {tf} has dtype {entry.dtype}, expected floating point weights")
        tensor = ckpt.read(tf)
        state[ours] = (tensor.t() if transpose else tensor).to(torch.float32).contiguous()
    if mismatches:
        raise CheckpointError(f"{source}: shapes do not match {cfg_path.name}: " + "; ".join(mismatches))
    return state, ignored


def open_variables(path: Path):
    """``(variables, directory, source, kind)`` for a release checkpoint (``kind`` "release") or a
    Keras ``save_weights`` file ("TF format" or "HDF5"), the variables under the release names."""
    from rosim.checkpoints.keras_weights import KerasWeights, is_hdf5

    if path.is_dir():
        h5 = sorted(p for p in path.iterdir() if p.suffix in (".h5", ".hdf5") and is_hdf5(p))
        if h5 and not any(path.glob("*.index")):
            if len(h5) > 1:
                raise CheckpointError(f"{path}: several HDF5 files {[p.name for p in h5]}; name one")
            path = h5[0]
    if is_hdf5(path):
        weights = KerasWeights(path)
        return weights, path.parent, str(path), "HDF5"
    prefix = resolve_prefix(path)
    ckpt = TFCheckpoint(prefix)
    if any(n.startswith("layer_with_weights-") for n in ckpt.names()):
        return KerasWeights(prefix), prefix.parent, str(prefix), "TF format"
    return ckpt, prefix.parent, str(prefix), "release"


def _allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name.startswith(str(p)) for p in prefixes)
