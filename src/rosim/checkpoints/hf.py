"""Importers for Hugging Face format checkpoints.

* RoFormer-Sim as the PyTorch port publishes it (``junnyu/roformer_chinese_sim_char_*``):
  ``roformer.*`` encoder keys, ``roformer.pooler.dense.*``, ``cls.predictions.*``.
* BERT (SimBERT v1 variant): ``bert.*`` (or unprefixed ``BertModel``) keys, absolute positions.

The name tables below are the whole mapping; nothing is renamed anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rosim.checkpoints.io import LoadReport, build_model, read_safetensors
from rosim.errors import CheckpointError, InputError
from rosim.modeling.model import RoFormerSim, RoFormerSimConfig
from rosim.tokenization.tokenizer import CharTokenizer

# rosim name -> HF name (within one layer / the embeddings), shared by RoFormer and BERT
_LAYER = {
    "attention.query": "attention.self.query",
    "attention.key": "attention.self.key",
    "attention.value": "attention.self.value",
    "attention.output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "ffn_output": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_EMBEDDINGS = {
    "word_embeddings": "word_embeddings",
    "token_type_embeddings": "token_type_embeddings",
    "position_embeddings": "position_embeddings",
    "layer_norm": "LayerNorm",
}


def rosim_to_hf_names(config: RoFormerSimConfig, prefix: str) -> dict[str, str]:
    """Map every rosim tensor name to its HF name (``prefix`` is "roformer" or "bert")."""
    with torch.device("meta"):  # names only: allocate nothing
        model = RoFormerSim(config)
    out: dict[str, str] = {}
    for name in model.state_dict():
        parts = name.split(".")
        leaf = parts[-1]
        if parts[0] == "embeddings":
            out[name] = f"{prefix}.embeddings.{_EMBEDDINGS[parts[1]]}.{leaf}"
        elif parts[0] == "layers":
            inner = ".".join(parts[2:-1])
            out[name] = f"{prefix}.encoder.layer.{parts[1]}.{_LAYER[inner]}.{leaf}"
        elif parts[0] == "pooler":
            out[name] = f"{prefix}.pooler.dense.{leaf}"
        elif parts[0] == "lm_head":
            if parts[1] == "bias":
                out[name] = "cls.predictions.bias"
            else:
                sub = {"dense": "dense", "layer_norm": "LayerNorm"}[parts[1]]
                out[name] = f"cls.predictions.transform.{sub}.{leaf}"
        else:  # pragma: no cover - a new module without a mapping is a bug
            raise KeyError(name)
    return out


def config_from_hf(data: dict, *, variant: str, notes: list[str] | None = None) -> RoFormerSimConfig:
    """Translate an HF ``config.json`` (RoFormer or BERT) into a rosim config.

    The pooler activation is not a standard HF key: RoFormer-Sim's pooler is linear (bert4keras
    ``with_pool='linear'``) whatever the config says, and SimBERT v1's is linear too unless the
    config names one (HF BERT configs carry no ``pooler_activation``; ``BertModel`` applies tanh).
    Every such choice is appended to ``notes``.
    """
    notes = [] if notes is None else notes
    stated = data.get("pooler_activation")
    if variant == "roformer":
        pooler = "linear"
        if stated not in (None, "linear"):
            notes.append(f"config says pooler_activation={stated!r}; RoFormer-Sim's pooler is linear "
                         "(with_pool='linear'), so linear is used")
    elif stated in ("linear", "tanh"):
        pooler = stated
    elif stated is None:
        pooler = "linear"
        notes.append("pooler activation: linear (SimBERT v1 was trained with with_pool='linear'; the config names "
                     "none). For a plain BERT whose pooler is tanh, pass --pooler-activation tanh")
    else:
        raise CheckpointError(f"unsupported pooler_activation {stated!r} (linear or tanh)")
    try:
        if variant == "roformer" and data.get("embedding_size", data["hidden_size"]) != data["hidden_size"]:
            raise CheckpointError("embedding_size != hidden_size (a projected embedding) is not supported")
        act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}.get(
            data.get("hidden_act", "gelu")
        )
        if act is None:
            raise CheckpointError(f"unsupported hidden_act {data.get('hidden_act')!r}")
        if data.get("rotary_value"):
            raise CheckpointError("rotary_value=True is not used by RoFormer-Sim and is not supported")
        return RoFormerSimConfig(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            num_layers=data["num_hidden_layers"],
            num_heads=data["num_attention_heads"],
            intermediate_size=data["intermediate_size"],
            hidden_dropout=data.get("hidden_dropout_prob", 0.1),
            attention_dropout=data.get("attention_probs_dropout_prob", 0.0),
            max_position=data.get("max_position_embeddings", 512),
            position="rotary" if variant == "roformer" else "absolute",
            type_vocab_size=data.get("type_vocab_size", 2),
            layer_norm_eps=data.get("layer_norm_eps", 1e-12),
            pooler_activation=pooler,
            hidden_act=act,
        )
    except KeyError as exc:
        raise CheckpointError(f"HF config lacks {exc.args[0]!r}") from None


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        return read_safetensors(directory / "model.safetensors")
    path = directory / "pytorch_model.bin"
    if not path.is_file():
        raise CheckpointError(f"{directory}: neither model.safetensors nor pytorch_model.bin found")
    try:  # weights_only: never unpickle arbitrary objects
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"{path} is corrupt or not a plain tensor dictionary: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a plain dictionary of tensors")
    return state


def convert_hf_state(
    state: dict[str, torch.Tensor], config: RoFormerSimConfig, *, prefix: str, allow_missing=(), source: str = "checkpoint"
) -> tuple[RoFormerSim, LoadReport]:
    """Build a rosim model from an HF state dict, strictly."""
    names = rosim_to_hf_names(config, prefix)
    # BertModel saved on its own has no "bert." prefix; accept both.
    if prefix and not any(k.startswith(prefix + ".") for k in state):
        state = {f"{prefix}.{k}" if not k.startswith("cls.") else k: v for k, v in state.items()}
    # tensors that carry no weights of their own
    skip = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", f"{prefix}.encoder.embed_positions.weight",
            f"{prefix}.embeddings.position_ids", "cls.seq_relationship.weight", "cls.seq_relationship.bias")
    ours = {}
    for rosim_name, hf_name in names.items():
        if hf_name in state:
            ours[rosim_name] = state[hf_name]
    used = set(names.values()) | set(skip)
    leftover = sorted(k for k in state if k not in used)
    if leftover:
        raise CheckpointError(f"{source}: unexpected tensors {leftover}")
    model, report = build_model(config, ours, allow_missing=allow_missing, source=source)
    if "cls.predictions.decoder.weight" in state and config.with_lm_head:
        if not torch.equal(state["cls.predictions.decoder.weight"], ours["embeddings.word_embeddings.weight"]):
            raise CheckpointError(f"{source}: the LM decoder is not tied to the token embeddings; rosim ties them")
    if "cls.predictions.decoder.bias" in state and "lm_head.bias" in ours:
        if not torch.equal(state["cls.predictions.decoder.bias"], ours["lm_head.bias"]):
            raise CheckpointError(f"{source}: cls.predictions.decoder.bias differs from cls.predictions.bias")
    # real weights of a head rosim does not have: say so rather than drop them silently
    report.ignored = sorted(set(report.ignored) | {k for k in state if k.startswith("cls.seq_relationship.")})
    return model, report


def import_hf(
    directory: str | os.PathLike, *, variant: str = "roformer", allow_missing=(), pooler_activation: str | None = None
) -> tuple[RoFormerSim, CharTokenizer, LoadReport]:
    """Import an HF-format directory (``config.json`` or bert4torch's ``bert4torch_config.json``,
    weights, ``vocab.txt``). ``pooler_activation`` overrides the default (see :func:`config_from_hf`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"HF checkpoint directory not found: {directory}")
    if variant not in ("roformer", "bert"):
        raise CheckpointError(f"variant must be 'roformer' or 'bert', got {variant!r}")
    from rosim.checkpoints.detect import read_hf_config, refuse_roformer_v2

    cfg_path, data = read_hf_config(directory)
    refuse_roformer_v2(cfg_path, data)
    state = _read_hf_weights(directory)
    notes: list[str] = []
    try:
        config = config_from_hf(data, variant=variant, notes=notes)
        if pooler_activation is not None:
            if pooler_activation != config.pooler_activation:
                notes.append(f"pooler activation: {pooler_activation} (asked for)")
            config.pooler_activation = pooler_activation
            config.__post_init__()
    except InputError as exc:  # includes CheckpointError
        raise CheckpointError(f"{cfg_path}: {exc}") from None
    has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
    has_lm = any(k.startswith("cls.predictions.") for k in state)
    pooler_asked = any(str(p).startswith("pooler") for p in allow_missing)
    if not has_lm:
        config.with_lm_head = False
    if not has_pooler and not pooler_asked:
        raise CheckpointError(
            f"{directory}: the checkpoint has no pooler (pooler.dense); RoFormer-Sim's sentence vector is the pooler "
            "output. Pass allow_missing=('pooler.',) (CLI: --allow-missing pooler) to initialise it randomly on purpose."
        )
    try:
        tokenizer = CharTokenizer.from_file(directory / "vocab.txt")
    except (InputError, FileNotFoundError) as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(f"{directory}: vocab.txt has {len(tokenizer)} tokens, config says {config.vocab_size}")
    model, report = convert_hf_state(state, config, prefix=variant, allow_missing=allow_missing, source=str(directory))
    report.notes.extend(notes)
    if cfg_path.name != "config.json":
        report.notes.append(f"config read from {cfg_path.name}")
    if not has_lm:
        report.notes.append("the checkpoint has no MLM head (cls.predictions.*): the model cannot generate")
    return model.eval(), tokenizer, report
