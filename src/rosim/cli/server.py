"""`rosim serve`: the HTTP API and demo page on uvicorn."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from rosim.errors import InputError, RosimError


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
    max_queue: Annotated[int, typer.Option(help="requests waiting for the model, per endpoint, before answering 503")] = 256,
    max_queue_wait: Annotated[float, typer.Option(help="seconds of work queued for the model, per endpoint (estimated "
                                                       "at the measured speed), beyond which a request gets 503 + Retry-After")] = 5.0,
    timeout: Annotated[float, typer.Option(help="seconds a request may wait for its result before 504")] = 60.0,
    header_timeout: Annotated[float, typer.Option(help="seconds a client has to send its request headers")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="seconds a client has to send its request body (then 408)")] = 10.0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads for encoding (and for generation with "
                                                     "--generation thread); default: half the CPUs")] = None,
    generation: Annotated[str, typer.Option(help="where /similar generates: 'process' (its own process, so that "
                                                 "/encode never waits for its interpreter lock) or 'thread'")] = "process",
    generation_threads: Annotated[int | None, typer.Option(help="torch CPU threads of the generation process "
                                                                "(default: the other half of the CPUs)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the HTTP API (/encode, /similarity, /similar, /search, /health, /docs) and the demo page at /."""
    from rosim.cli.inference import load_model
    from rosim.server import Limits, create_app

    if not 0 <= port <= 65535:
        raise InputError(f"--port must be 0..65535, got {port}")
    if threads is not None and threads <= 0:
        raise InputError(f"--threads must be positive, got {threads}")
    if generation_threads is not None and generation_threads <= 0:
        raise InputError(f"--generation-threads must be positive, got {generation_threads}")
    if generation not in ("process", "thread"):
        raise InputError(f"--generation must be 'process' or 'thread', got {generation!r}")
    if not (header_timeout > 0 and body_timeout > 0):
        raise InputError("--header-timeout and --body-timeout must be positive")
    try:
        limits = Limits(max_texts=max_texts, max_text_chars=max_text_chars, max_n=max_n, max_queue=max_queue,
                        request_timeout_s=timeout, max_queue_s=max_queue_wait, body_timeout_s=body_timeout)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    import torch

    # generation (a process or a thread) and the short encode calls share the cores: half each by default
    half = max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads or half)
    # the event loop and the encode thread take the GIL back from other Python work sooner
    sys.setswitchinterval(0.001)
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
    sock = _bind(host, port)  # before starting anything: a busy port is one line, not a traceback
    generator = None
    try:
        if generation == "process":
            from rosim.server.generation import GenerationProcess, model_loader

            generator = GenerationProcess(model_loader(model), threads=generation_threads or half)
            generator.start()
            if not generator.wait_ready():
                raise RosimError(f"the generation process could not start: {generator.failure}")
        app = create_app(sim, idx, api_key=api_key, max_batch=max_batch, max_batch_rows=max_batch_rows,
                         max_wait_ms=max_wait_ms, batching=not no_batching, limits=limits, generation=generator)
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"rosim: serving {sim.name} on http://{shown}:{sock.getsockname()[1]}/ (docs at /docs)"
                   + (", /search on" if idx is not None else ""), err=True)
        _run(app, sock, log_level=log_level, header_timeout=header_timeout, max_queue=max_queue)
    finally:
        sock.close()
        if generator is not None:
            generator.close()  # no orphan: the child is stopped however the server ends


def _run(app, sock: socket.socket, *, log_level: str, header_timeout: float, max_queue: int) -> None:
    import uvicorn

    from rosim.server.protocol import header_timeout_protocol

    # uvicorn answers 503 itself beyond limit_concurrency open requests: a second bound before the queues'
    config = uvicorn.Config(app, log_level=log_level, limit_concurrency=3 * max_queue + 64, timeout_keep_alive=5,
                            timeout_graceful_shutdown=10, http=header_timeout_protocol(header_timeout),
                            h11_max_incomplete_event_size=16 * 1024)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a clean stop
        pass
    if not server.started:
        raise RosimError("the server did not start (see uvicorn's message above)")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"--host {host!r} is not an address of this machine ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
        raise InputError(f"{host}:{port} {why}: pick another --port") from None
    sock.set_inheritable(True)
    return sock


def register(app: typer.Typer) -> None:
    app.command()(serve)
