"""`rosim similar`, `rosim sim`, `rosim encode`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from rosim import limits
from rosim.errors import InputError
from rosim.textio import output_path

ModelOpt = Annotated[Path | None, typer.Option("--model", "-m", help="rosim checkpoint directory (default: the embedded model)")]
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
BackendOpt = Annotated[str, typer.Option(
    "--backend", help="torch, onnx (ONNX Runtime, fp32) or onnx-int8 (int8 weights); auto: onnx when --model is a "
    "directory made by `rosim export onnx`, else torch")]


def load_model(model: Path | None):
    from rosim.inference.sim_model import SimModel

    return SimModel.load(model)


def load_encoder(model: Path | None, backend: str = "auto", *, device: str | None = None):
    """A sentence encoder for ``--model`` on ``--backend``: a SimModel (torch) or an OnnxEncoder.

    The ONNX path never imports torch (a process that only encodes starts in a fraction of the time).
    """
    from rosim.inference.onnx_backend import MANIFEST_NAME

    if backend not in BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    is_export = model is not None and (model / MANIFEST_NAME).is_file()
    if backend == "auto":
        backend = "onnx" if is_export else "torch"
    if backend == "torch":
        if is_export and not (model / "model.safetensors").is_file():
            raise InputError(f"{model} is an ONNX export (made by `rosim export onnx`): use --backend onnx or "
                             "onnx-int8, or pass the PyTorch checkpoint it was exported from")
        from rosim.inference.sim_model import SimModel

        if device is None:
            return SimModel.load(model)
        from rosim.training.trainer import resolve_device

        return SimModel.load(model, device=resolve_device(device))
    if model is None:
        raise InputError(f"--backend {backend} needs --model DIR, a directory made by `rosim export onnx MODEL_DIR "
                         "OUT` (no ONNX model is embedded in the package)")
    if device not in (None, "auto", "cpu"):
        raise InputError(f"--backend {backend} runs on the CPU; --device {device} applies to --backend torch only")
    from rosim.inference.onnx_backend import OnnxEncoder

    return OnnxEncoder(model, precision="int8" if backend == "onnx-int8" else "fp32")


def similar(
    texts: Annotated[list[str] | None, typer.Argument(help="sentences to find similar sentences for")] = None,
    n: Annotated[int, typer.Option("-n", help="candidates generated per input")] = 100,
    k: Annotated[int | None, typer.Option("-k", help="results kept per input  [default: 20, at most n]")] = None,
    model: ModelOpt = None,
    seed: Annotated[int | None, typer.Option(help="random seed for sampling")] = None,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per candidate")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array per input on its own line")] = False,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="augment every line of this UTF-8 file")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON-lines output for --file (resumable)")] = None,
    batch: Annotated[int, typer.Option(help="inputs per resumable unit with --file (results are written per unit)")] = 32,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Generate similar sentences and rank them by similarity to the input."""
    options = {"n": n, "k": k, "seed": seed, "top_p": top_p, "max_new_tokens": max_new_tokens}
    limits.check_similar_options(**options)  # before the model loads: a bad option fails at once
    if file is not None:
        if texts:
            raise InputError("give either TEXT arguments or --file, not both")
        if output is None:
            raise InputError("--file needs --output/-o OUT.jsonl")
        return _similar_file(file, output, options, model=model, batch=batch, quiet=quiet)
    if not texts:
        raise InputError("give at least one TEXT (or --file IN.txt -o OUT.jsonl)")
    results = load_model(model).similar(texts, **options, show_progress_bar=False if quiet else None)
    for text, res in zip(texts, results, strict=True):
        if as_json:
            typer.echo(json.dumps([{"text": t, "score": round(s, 6)} for t, s in res], ensure_ascii=False))
        else:
            if len(texts) > 1:
                typer.echo(f"# {text}")
            for t, s in res:
                typer.echo(f"{s:.4f}\t{t}")


def _similar_file(file: Path, output: Path, options: dict, *, model, batch: int, quiet: bool) -> None:
    """``similar`` over a file, written unit by unit; a rerun resumes exactly.

    Inputs (distinct lines, in file order) are cut into units of ``batch``; unit ``u`` is sampled
    with seed ``seed + u``, so each unit's results do not depend on what ran before. A sidecar
    ``OUT.rosim.json`` records the model, the input file and the options: a rerun resumes only an
    output it wrote with the same ones, recomputes a unit that was cut short and writes just its
    missing lines, so a resumed seeded run equals an uninterrupted one.
    """
    from tqdm.auto import tqdm

    from rosim.textio import read_lines

    batch = limits.check_int("--batch", batch, 1, limits.MAX_BATCH)
    inputs = list(dict.fromkeys(read_lines(file)))
    output = output_path(output)
    sim = load_model(model)
    record = {"format": "rosim-similar/1", "input_sha256": _sha256(file), "model": sim.identity()["weights"],
              **options, "batch": batch}
    done = _resume_state(output, record)
    units = [inputs[s:s + batch] for s in range(0, len(inputs), batch)]
    todo = sum(1 for t in inputs if t not in done)
    bar = tqdm(total=todo, desc="similar", disable=quiet or not sys.stderr.isatty())
    with open(output, "a", encoding="utf-8") as f:
        for u, unit in enumerate(units):
            if all(t in done for t in unit):
                continue
            seed = None if options["seed"] is None else (options["seed"] + u) % (limits.MAX_SEED + 1)
            results = sim.similar(unit, **{**options, "seed": seed}, show_progress_bar=False)
            f.write("".join(
                json.dumps({"text": t, "similar": [{"text": s, "score": round(v, 6)} for s, v in r]},
                           ensure_ascii=False) + "\n"
                for t, r in zip(unit, results, strict=True) if t not in done
            ))
            f.flush()
            bar.update(sum(1 for t in unit if t not in done))
    bar.close()
    if not quiet:
        typer.echo(f"wrote {todo} new lines to {output} ({len(inputs) - todo} already there)", err=True)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".rosim.json")


def _resume_state(out: Path, record: dict) -> set[str]:
    """Inputs already in ``out`` when its sidecar matches ``record`` (else a clear refusal); a
    truncated last line (killed mid-write) is cut off. A new output gets its sidecar first."""
    from rosim.textio import atomic_write

    side = _sidecar(out)
    if not out.exists() or out.stat().st_size == 0:
        with atomic_write(side) as f:
            json.dump(record, f, indent=1)
        out.touch()
        return set()
    try:
        old = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{out} exists and was not written by `rosim similar --file` (no {side.name}): "
                         "refusing to append to it; remove it or pick another -o") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{side} is unreadable ({e}): remove {out} and {side.name} to start again") from None
    changed = [key for key in record if old.get(key) != record[key]]
    if changed:
        what = ", ".join(f"{key} {old.get(key)!r} -> {record[key]!r}" for key in changed if key != "input_sha256")
        if "input_sha256" in changed:
            what = ", ".join(filter(None, ["the input file changed", what]))
        raise InputError(f"{out} was written with other settings ({what}): resuming would mix them; "
                         "pick another -o or remove it to start again")
    raw = out.read_bytes()
    done, good = set(), 0
    for number, line in enumerate(raw.splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            break
        try:
            done.add(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise InputError(f"{out} line {number} is not a rosim similar result; "
                             "remove the file to start again") from None
        good += len(line)
    if good != len(raw):
        with open(out, "r+b") as f:
            f.truncate(good)
    return done


def sim(
    text_a: Annotated[str, typer.Argument()],
    text_b: Annotated[str, typer.Argument()],
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
) -> None:
    """Cosine similarity of two sentences."""
    typer.echo(f"{load_encoder(model, backend).similarity(text_a, text_b):.4f}")


def encode(
    file: Annotated[Path, typer.Argument(help="UTF-8 file, one sentence per line")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output .npy (float32, n x dim)")],
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    pooling: Annotated[str, typer.Option(help="pooler|cls|mean|first-last-mean")] = "pooler",
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="keep raw (unnormalised) vectors")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    backend: BackendOpt = "auto",
) -> None:
    """Encode every line of FILE into sentence vectors saved as a NumPy .npy file."""
    import numpy as np

    from rosim.textio import atomic_write, output_path, read_lines

    output_path(output)  # refuse a directory or device before the work
    texts = read_lines(file)
    vecs = load_encoder(model, backend).encode(texts, batch_size=batch_size, pooling=pooling, normalize=not no_normalize,
                                    show_progress_bar=None if not quiet else False)
    with atomic_write(output, "wb") as f:
        np.save(f, vecs.astype(np.float32))
    if not quiet:
        typer.echo(f"wrote {vecs.shape[0]} x {vecs.shape[1]} vectors to {output}", err=True)


def register(app: typer.Typer) -> None:
    app.command()(similar)
    app.command()(sim)
    app.command()(encode)
