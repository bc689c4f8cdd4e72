"""`rosim serve`: the HTTP API and demo page on uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from rosim.errors import InputError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Annotated[Path | None, typer.Option("--model", "-m", help="rosim checkpoint directory (default: the embedded model)")] = None,
    index: Annotated[Path | None, typer.Option("--index", help="vector index directory built by `rosim index build`; enables /search")] = None,
    host: Annotated[str, typer.Option(help="address to bind; the default serves this machine only")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one)")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="ROSIM_API_KEY",
                                                help="require this key ('Authorization: Bearer KEY' or 'X-API-Key: KEY')")] = None,
    max_batch: Annotated[int, typer.Option(help="texts per merged encode call")] = 64,
    max_batch_rows: Annotated[int, typer.Option(help="generated rows (texts x n) per merged /similar call")] = 128,
    max_wait_ms: Annotated[float, typer.Option(help="how long a request waits for others to batch with")] = 5.0,
    no_batching: Annotated[bool, typer.Option("--no-batching", help="one model call per request (for comparison)")] = False,
    max_texts: Annotated[int, typer.Option(help="texts per request")] = 64,
    max_text_chars: Annotated[int, typer.Option(help="characters per text")] = 512,
    max_n: Annotated[int, typer.Option(help="candidates per text for /similar")] = 128,
    max_queue: Annotated[int, typer.Option(help="requests waiting for the model before answering 503")] = 256,
    timeout: Annotated[float, typer.Option(help="seconds a request may wait for its result before 504")] = 60.0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the HTTP API (/encode, /similarity, /similar, /search, /health, /docs) and the demo page at /."""
    import uvicorn

    from rosim.cli.inference import load_model
    from rosim.server import Limits, create_app

    if not 0 <= port <= 65535:
        raise InputError(f"--port must be 0..65535, got {port}")
    if threads is not None:
        if threads <= 0:
            raise InputError(f"--threads must be positive, got {threads}")
        import torch

        torch.set_num_threads(threads)
    try:
        limits = Limits(max_texts=max_texts, max_text_chars=max_text_chars, max_n=max_n, max_queue=max_queue,
                        request_timeout_s=timeout)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if max_batch <= 0 or max_batch_rows <= 0 or max_wait_ms < 0:
        raise InputError("--max-batch and --max-batch-rows must be positive and --max-wait-ms >= 0")
    sim = load_model(model)
    idx = None
    if index is not None:
        from rosim.server.indexes import open_index

        idx = open_index(index, sim)
    if not _is_loopback(host) and not api_key:
        typer.echo(f"rosim: warning: serving on {host} without --api-key: anyone who can reach this "
                   "address can use the model", err=True)
    app = create_app(sim, idx, api_key=api_key, max_batch=max_batch, max_batch_rows=max_batch_rows,
                     max_wait_ms=max_wait_ms, batching=not no_batching, limits=limits)
    shown = f"[{host}]" if ":" in host else host
    where = f"http://{shown}:{port}/" if port else f"a free port of {shown} (uvicorn's line below names it)"
    typer.echo(f"rosim: serving {sim.name} on {where} (docs at /docs)"
               + (", /search on" if idx is not None else ""), err=True)
    # uvicorn answers 503 itself beyond limit_concurrency open requests: a second bound before the queue's
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=max_queue + 64,
                timeout_keep_alive=5, timeout_graceful_shutdown=10)


def register(app: typer.Typer) -> None:
    app.command()(serve)
