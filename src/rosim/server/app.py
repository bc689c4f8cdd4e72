"""The FastAPI application: ``create_app(model, index)``.

Endpoints (JSON in, JSON out; errors are ``{"error": {"code", "message", "details"}}``):

- ``POST /encode``      sentence vectors
- ``POST /similarity``  cosine similarities
- ``POST /similar``     generate-then-rank similar sentences
- ``POST /search``      nearest neighbours in the loaded index (404 when none is loaded)
- ``GET  /health``      model, index, limits, batching counters and the generation process
- ``GET  /``            the demo page; ``/docs`` and ``/openapi.json`` describe the API

The parts, by idea: :mod:`~rosim.server.intake` (API key, body limits, load shedding, disconnects),
:mod:`~rosim.server.admission` (the bounded queue per kind of model call),
:mod:`~rosim.server.model_calls` (what the queues run), :mod:`~rosim.server.generation` (generation in
its own process), :mod:`~rosim.server.routes` (the endpoints) and :mod:`~rosim.server.errors`.
"""

import dataclasses
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import FastAPI

from rosim.errors import InputError
from rosim.server.admission import ModelQueues
from rosim.server.auth import ApiKey, key_schemes
from rosim.server.errors import install_error_handlers
from rosim.server.intake import RequestIntake
from rosim.server.model_calls import ModelCalls, length_buckets
from rosim.server.routes import add_model_routes, add_service_routes
from rosim.server.schemas import Limits, build_request_models

__all__ = ["SearchIndex", "create_app", "length_buckets"]


class SearchIndex(Protocol):
    """What ``/search`` needs from an index: texts in, ``(text, score)`` neighbours out."""

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]: ...


def create_app(
    model,
    index: SearchIndex | None = None,
    *,
    api_key: str | None = None,
    max_batch: int = 64,
    max_batch_rows: int = 128,
    max_wait_ms: float = 5.0,
    batching: bool = True,
    encode_batch_size: int = 32,
    generation=None,
    limits: Limits | None = None,
    **limit_overrides,
) -> FastAPI:
    """An ASGI app serving ``model`` (a :class:`~rosim.inference.sim_model.SimModel`) and ``index``.

    ``max_batch``: texts per merged encode call; ``max_batch_rows``: generated rows (texts x n) per
    merged ``/similar`` call (a single larger request still runs, alone; on a CPU, rows beyond ~100 gain
    little per row while every request of the call waits for all of it); ``max_wait_ms``: how long the
    first request of a batch waits for others; ``batching=False``: one model call per request;
    ``encode_batch_size``: most texts per forward pass inside a merged encode call (see :func:`length_buckets`).
    ``generation``: a :class:`~rosim.server.generation.GenerationProcess` to run ``/similar`` in (started
    and stopped with the app); without one, generation runs on a thread of this process.
    ``limits`` (or keyword overrides such as ``max_texts=16``) bound each request, see :class:`Limits`.
    ``api_key``: when set, the POST endpoints need ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
    """
    limits = dataclasses.replace(limits or Limits(), **limit_overrides)
    key = None if api_key is None else ApiKey(api_key)
    if encode_batch_size <= 0:
        raise InputError(f"encode_batch_size must be positive, got {encode_batch_size}")
    queues = ModelQueues(ModelCalls(model, index, encode_batch_size, generation), limits, max_batch=max_batch,
                         max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms, batching=batching,
                         search=index is not None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if generation is not None:
            generation.start()
        yield
        await queues.aclose()
        if generation is not None:
            generation.close()

    app = FastAPI(title="rosim", version="0.1.0", lifespan=lifespan,
                  summary="RoFormer-Sim: encode, compare, generate and retrieve similar Chinese sentences.",
                  docs_url=None, redoc_url=None)  # FastAPI's Swagger UI and ReDoc need a CDN: blank offline
    app.state.limits, app.state.model, app.state.index, app.state.batchers = limits, model, index, queues.all
    app.state.generation = generation
    install_error_handlers(app)
    add_model_routes(app, queues, build_request_models(limits), index, key_schemes(key))
    add_service_routes(app, identity=model.identity(), index=index, auth_required=key is not None, limits=limits,
                       queues=queues, generation=generation)
    app.add_middleware(RequestIntake, max_bytes=limits.max_body_bytes, api_key=key,
                       body_timeout_s=limits.body_timeout_s, shed=queues.refusal)
    return app
