"""`rosim export onnx`: the sentence encoder as ONNX (fp32 + int8) for CPU deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rosim.errors import InputError

export_app = typer.Typer(help="Export a model for deployment.", no_args_is_help=True)


@export_app.command("onnx")
def export_onnx_command(
    model_dir: Annotated[str, typer.Argument(metavar="MODEL_DIR",
                                             help="rosim checkpoint directory, or 'default' for the embedded model")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="directory to write (model.onnx, model.int8.onnx, vocab, manifest)")],
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="also write model.int8.onnx (int8 weights)")] = True,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor",
                                              help="int8 scales per output channel or per tensor")] = True,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    max_length: Annotated[int, typer.Option(help="tokens per text (longer texts are truncated), as SimModel")] = 64,
    atol: Annotated[float, typer.Option(help="largest allowed |ONNX - PyTorch| on the pooled vectors (fp32)")] = 1e-4,
    int8_min_cosine: Annotated[float, typer.Option(help="smallest allowed cosine between int8 and PyTorch vectors")] = 0.98,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace OUT if it is an earlier export")] = False,
) -> None:
    """Export MODEL_DIR's sentence encoder to ONNX, check it against PyTorch, and write OUT atomically.

    Run it with `rosim sim A B --model OUT --backend onnx` (or onnx-int8), `rosim encode`, `rosim search`,
    or `rosim.inference.onnx_backend.OnnxEncoder(OUT)` in Python (no torch needed).
    """
    from rosim.inference.onnx_backend import MANIFEST_NAME
    from rosim.inference.sim_model import DEFAULT_MODEL_DIR, SimModel

    if max_length < 3:
        raise InputError(f"--max-length must be at least 3, got {max_length}")
    source = Path(model_dir)
    if model_dir == "default" and not source.exists():
        sim, source = SimModel.default(max_length=max_length), DEFAULT_MODEL_DIR
    else:
        if (source / MANIFEST_NAME).is_file():
            raise InputError(f"{source} is already an ONNX export; export the PyTorch checkpoint it came from")
        sim = SimModel.from_pretrained(source, max_length=max_length)
        if source.resolve() == DEFAULT_MODEL_DIR:
            sim.name = "rosim-default"
    from rosim.inference.onnx_export import export_onnx

    manifest = export_onnx(sim, out, int8=int8, per_channel=per_channel, opset=opset, atol=atol,
                           int8_min_cosine=int8_min_cosine, overwrite=overwrite, source_dir=source)
    v = manifest["verification"]
    sizes = ", ".join(f"{name} {entry['bytes'] / 2**20:.1f} MiB" for name, entry in manifest["files"].items()
                      if name.endswith(".onnx"))
    typer.echo(f"exported {sim.name} -> {out} ({sizes}; opset {opset}, {manifest['pooling']} pooling, "
               f"{manifest['dim']}-d, max_length {manifest['max_length']})")
    line = f"checked on {v['texts']} sentences: fp32 max |diff| {v['fp32_max_abs_diff']:.2e}"
    if "int8_min_cosine" in v:
        line += f"; int8 cosine min {v['int8_min_cosine']:.5f}, mean {v['int8_mean_cosine']:.5f}"
    typer.echo(line)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
