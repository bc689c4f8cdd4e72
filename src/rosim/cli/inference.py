"""`rosim similar`, `rosim sim`, `rosim encode`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from rosim.errors import InputError
from rosim.limits import check_generation

ModelOpt = Annotated[Path | None, typer.Option("--model", "-m", help="rosim checkpoint directory (default: the embedded model)")]


def load_model(model: Path | None):
    from rosim.inference.sim_model import SimModel

    return SimModel.load(model)


def _resume_state(out: Path) -> set[str]:
    """Inputs already written to ``out``; a truncated last line (killed mid-write) is dropped."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    done, good = set(), 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            done.add(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise InputError(f"{out} exists but is not a rosim similar output; remove it or pick another -o") from None
        good += len(line)
    if good != len(raw):
        with open(out, "r+b") as f:
            f.truncate(good)
    return done


def similar(
    texts: Annotated[list[str] | None, typer.Argument(help="sentences to find similar sentences for")] = None,
    n: Annotated[int, typer.Option("-n", help="candidates generated per input")] = 100,
    k: Annotated[int, typer.Option("-k", help="results kept per input")] = 20,
    model: ModelOpt = None,
    seed: Annotated[int | None, typer.Option(help="random seed for sampling")] = None,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = 0.95,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array per input on its own line")] = False,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="augment every line of this UTF-8 file")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON-lines output for --file (resumable)")] = None,
    batch: Annotated[int, typer.Option(help="inputs generated together with --file")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Generate similar sentences and rank them by similarity to the input."""
    check_generation(n=n, k=k, seed=seed, texts=batch if file is not None else len(texts or ()), batch=batch)
    if file is not None:
        if texts:
            raise InputError("give either TEXT arguments or --file, not both")
        if output is None:
            raise InputError("--file needs --output/-o OUT.jsonl")
        return _similar_file(file, output, n=n, k=k, model=model, seed=seed, top_p=top_p, batch=batch, quiet=quiet)
    if not texts:
        raise InputError("give at least one TEXT (or --file IN.txt -o OUT.jsonl)")
    sim = load_model(model)
    results = sim.similar(texts, n=n, k=k, seed=seed, top_p=top_p)
    for text, res in zip(texts, results, strict=True):
        if as_json:
            typer.echo(json.dumps([{"text": t, "score": round(s, 6)} for t, s in res], ensure_ascii=False))
        else:
            if len(texts) > 1:
                typer.echo(f"# {text}")
            for t, s in res:
                typer.echo(f"{s:.4f}\t{t}")


def _similar_file(file: Path, output: Path, *, n, k, model, seed, top_p, batch, quiet) -> None:
    from tqdm.auto import tqdm

    from rosim.textio import read_lines

    inputs = read_lines(file)
    if batch <= 0:
        raise InputError(f"--batch must be positive, got {batch}")
    done = _resume_state(output)
    todo = [t for t in dict.fromkeys(inputs) if t not in done]
    sim = load_model(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="similar", disable=quiet or not sys.stderr.isatty())
    with open(output, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            chunk_seed = None if seed is None else seed + start
            results = sim.similar(chunk, n=n, k=k, seed=chunk_seed, top_p=top_p)
            f.write("".join(
                json.dumps({"text": t, "similar": [{"text": s, "score": round(v, 6)} for s, v in r]},
                           ensure_ascii=False) + "\n"
                for t, r in zip(chunk, results, strict=True)
            ))
            f.flush()
            bar.update(len(chunk))
    bar.close()
    if not quiet:
        typer.echo(f"wrote {len(todo)} new lines to {output} ({len(done)} already there)", err=True)


def sim(
    text_a: Annotated[str, typer.Argument()],
    text_b: Annotated[str, typer.Argument()],
    model: ModelOpt = None,
) -> None:
    """Cosine similarity of two sentences."""
    typer.echo(f"{load_model(model).similarity(text_a, text_b):.4f}")


def encode(
    file: Annotated[Path, typer.Argument(help="UTF-8 file, one sentence per line")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output .npy (float32, n x dim)")],
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    pooling: Annotated[str, typer.Option(help="pooler|cls|mean|first-last-mean")] = "pooler",
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="keep raw (unnormalised) vectors")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Encode every line of FILE into sentence vectors saved as a NumPy .npy file."""
    import numpy as np

    from rosim.textio import atomic_write, read_lines

    texts = read_lines(file)
    vecs = load_model(model).encode(texts, batch_size=batch_size, pooling=pooling, normalize=not no_normalize,
                                    show_progress_bar=None if not quiet else False)
    with atomic_write(output, "wb") as f:
        np.save(f, vecs.astype(np.float32))
    if not quiet:
        typer.echo(f"wrote {vecs.shape[0]} x {vecs.shape[1]} vectors to {output}", err=True)


def register(app: typer.Typer) -> None:
    app.command()(similar)
    app.command()(sim)
    app.command()(encode)
