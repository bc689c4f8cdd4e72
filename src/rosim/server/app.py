"""The FastAPI application: ``create_app(model, index)``.

Endpoints (JSON in, JSON out; errors are ``{"error": {"code", "message", "details"}}``):

- ``POST /encode``      sentence vectors
- ``POST /similarity``  cosine similarities
- ``POST /similar``     generate-then-rank similar sentences
- ``POST /search``      nearest neighbours in the loaded index (404 when none is loaded)
- ``GET  /health``      model, index, limits and batching counters
- ``GET  /``            the demo page; ``/docs`` and ``/openapi.json`` describe the API

Model calls run on two dedicated threads, one for generation (``/similar``) and one for the short
calls (``/encode``, ``/similarity``, ``/search``), so that vectors are never queued behind minutes of
sampling; concurrent requests are merged by :class:`MicroBatcher`. Each endpoint's queue is bounded
(by requests and by the estimated wait): beyond it a request is answered 503 with ``Retry-After`` at
once. A request whose client disconnects is cancelled and its queued work dropped; a body that does
not arrive within ``body_timeout_s`` is answered 408.
"""

import asyncio
import dataclasses
import hmac
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from rosim.errors import InputError
from rosim.inference.common import scores_by_forms, unique_texts
from rosim.server.batching import MicroBatcher, QueueFull
from rosim.server.schemas import (
    EncodeResponse,
    ErrorResponse,
    Limits,
    PairwiseResponse,
    SearchResponse,
    SimilarityResponse,
    SimilarResponse,
    build_request_models,
)

log = logging.getLogger("rosim.server")
STATIC_DIR = Path(__file__).resolve().parent / "static"


class SearchIndex(Protocol):
    """What ``/search`` needs from an index: texts in, ``(text, score)`` neighbours out."""

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]: ...


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, details: list | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed JSON"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when the server has one)"},
    408: {"model": ErrorResponse, "description": "the request body did not arrive in time"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    415: {"model": ErrorResponse, "description": "the body is not sent as application/json"},
    422: {"model": ErrorResponse, "description": "a field is missing, of the wrong type or beyond a limit"},
    503: {"model": ErrorResponse, "description": "too much work is waiting for the model; retry after "
          "the Retry-After header's seconds"},
    504: {"model": ErrorResponse, "description": "the request waited longer than the server's timeout"},
}


# ---------------------------------------------------------------------- the model side
class _Engine:
    """The functions the batchers run on the model thread: ``run(key, items) -> one result per item``."""

    def __init__(self, model, index: SearchIndex | None, encode_batch_size: int):
        self.model, self.index, self.encode_batch_size = model, index, encode_batch_size

    def encode(self, key, texts: list[str]) -> list[np.ndarray]:
        unique = list(dict.fromkeys(texts))  # merged requests often share texts
        row: dict[str, np.ndarray] = {}
        limit = int(getattr(self.model, "max_length", 64))
        for chunk in length_buckets(unique, cap=self.encode_batch_size, max_tokens=limit):
            part = [unique[i] for i in chunk]
            vecs = self.model.encode(part, normalize=False, batch_size=self.encode_batch_size)
            row.update(zip(part, vecs, strict=True))
        return [row[t] for t in texts]

    def similar(self, key, texts: list[str]) -> list[list[tuple[str, float]]]:
        _, n, top_p, max_new_tokens, seed = key
        return self.model.similar(texts, n=n, k=n, top_p=top_p, max_new_tokens=max_new_tokens,
                                  seed=None if seed is None else seed[0])

    def search(self, key, items: list[tuple[str, int]]) -> list[list[tuple[str, float]]]:
        k = max(kk for _, kk in items)
        found = self.index.search([t for t, _ in items], k)
        return [list(f)[:kk] for f, (_, kk) in zip(found, items, strict=True)]


def length_buckets(texts: list[str], *, cap: int = 32, waste: float = 1.3, max_tokens: int = 64) -> list[list[int]]:
    """Indices of ``texts`` in forward passes of similar length: sorted by length, a pass closes when
    it holds ``cap`` texts or padding to its longest text would cost more than ``waste`` times its
    real length. A merged batch of mixed lengths padded as one pass wastes more than batching saves
    on a CPU (``benchmarks/serve.py``). Characters stand in for tokens (one per CJK character); the
    model reads at most ``max_tokens`` of them, [CLS] and [SEP] included."""
    def size_of(i: int) -> int:
        return min(len(texts[i]) + 2, max_tokens)

    order = sorted(range(len(texts)), key=size_of)
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        size = size_of(i)
        if current and (len(current) >= cap or size * (len(current) + 1) > waste * (total + size)):
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        chunks.append(current)
    return chunks


def _index_info(index) -> dict | None:
    if index is None:
        return None
    info: dict[str, Any] = {"type": type(index).__name__}
    if isinstance(getattr(index, "kind", None), str):
        info["kind"] = index.kind
    for attr in ("ntotal", "size"):
        value = getattr(index, attr, None)
        if isinstance(value, int):
            info["size"] = value
            break
    else:
        try:
            info["size"] = len(index)
        except TypeError:
            pass
    return info


# ---------------------------------------------------------------------- middleware
def _given_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key is not None:
        return x_api_key
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return None


def _auth_failure(given: str | None, api_key: str) -> ApiError | None:
    if given is None:
        return ApiError(401, "unauthorized", "this server needs an API key: send 'Authorization: Bearer KEY' "
                        "or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode("latin-1", "replace"), api_key.encode("utf-8")):
        return ApiError(401, "unauthorized", "wrong API key", {"WWW-Authenticate": "Bearer"})
    return None


class _Gate:
    """Before a POST body is read: refuse a missing or wrong API key (401), then a body over
    ``max_bytes`` (413, by Content-Length or by counting), or one that takes longer than
    ``body_timeout_s`` to arrive (408). The body is then replayed to the app, and the connection is
    watched: when the client disconnects before its answer, the app's handling is cancelled (so
    queued model work for it is dropped)."""

    def __init__(self, app, max_bytes: int, api_key: str | None = None, body_timeout_s: float = 10.0,
                 shed=None):
        self.app, self.max_bytes, self.api_key, self.body_timeout_s = app, max_bytes, api_key, body_timeout_s
        self.shed = shed  # path -> QueueFull | None: a 503 given before the body is parsed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        if self.api_key:
            failure = _auth_failure(_given_key(headers.get("authorization"), headers.get("x-api-key")), self.api_key)
            if failure is not None:
                response = _error(failure.status, failure.code, failure.message, headers=failure.headers)
                return await response(scope, receive, send)
        try:
            declared = int(headers.get("content-length", "-1"))
        except ValueError:
            declared = -1
        if declared > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                response = _error(408, "request_timeout", f"the request body did not arrive within "
                                  f"{self.body_timeout_s:g} s", headers={"Connection": "close"})
                return await response(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        busy = self.shed(scope.get("path", "")) if self.shed is not None else None
        if busy is not None:  # overloaded: answer before spending time on parsing and validation
            response = _error(503, "busy", str(busy), headers={"Retry-After": str(int(busy.retry_after_s))})
            return await response(scope, receive, send)
        return await self._run_watched(scope, receive, send, b"".join(chunks))

    async def _run_watched(self, scope, receive, send, body: bytes):
        """Run the app on ``body``; cancel it if the client disconnects before the answer is sent."""
        disconnected = asyncio.Event()
        delivered = answered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def tracked_send(message):
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, replay, tracked_send))

        async def watch():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    if not answered and not handler.done():
                        handler.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if disconnected.is_set() and not (current is not None and current.cancelling()):
                return  # the client is gone: nobody to answer
            raise
        finally:
            watcher.cancel()

    async def _refuse(self, scope, receive, send):
        response = _error(413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes")
        await response(scope, receive, send)


def _describe_validation(errors) -> tuple[int, str, list[dict]]:
    details = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        if e.get("type") == "missing" and not loc:
            msg = "the body is empty: send a JSON object"
        item = {"loc": loc, "type": e.get("type", ""), "msg": msg}
        if e.get("ctx"):
            item["ctx"] = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in e["ctx"].items()}
        details.append(item)
    if any(d["type"] == "json_invalid" for d in details):
        ctx = next(d.get("ctx", {}) for d in details if d["type"] == "json_invalid")
        return 400, f"malformed JSON: {ctx.get('error', 'could not parse the body')}", details
    parts = [f"{'.'.join(d['loc'])}: {d['msg']}" if d["loc"] else d["msg"] for d in details[:5]]
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return 422, "; ".join(parts) + more, details


# ---------------------------------------------------------------------- the app
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
    limits: Limits | None = None,
    **limit_overrides,
) -> FastAPI:
    """An ASGI app serving ``model`` (a :class:`~rosim.inference.sim_model.SimModel`) and ``index``.

    ``max_batch``: texts per merged encode call; ``max_batch_rows``: generated rows (texts x n) per
    merged ``/similar`` call (a single larger request still runs, alone; on a CPU, rows beyond ~100 gain
    little per row while every request of the call waits for all of it); ``max_wait_ms``: how long the
    first request of a batch waits for others; ``batching=False``: one model call per request;
    ``encode_batch_size``: most texts per forward pass inside a merged encode call (see :func:`length_buckets`).
    ``limits`` (or keyword overrides such as ``max_texts=16``) bound each request, see :class:`Limits`.
    ``api_key``: when set, the POST endpoints need ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
    """
    limits = dataclasses.replace(limits or Limits(), **limit_overrides)
    if api_key is not None and not api_key:
        raise InputError("api_key must be a non-empty string (or None for no key)")
    req = build_request_models(limits)
    if encode_batch_size <= 0:
        raise InputError(f"encode_batch_size must be positive, got {encode_batch_size}")
    engine = _Engine(model, index, encode_batch_size)
    # generation gets its own thread: a short encode never waits behind a long sampling call
    short_calls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rosim-encode")
    generation = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rosim-generate")
    common = dict(max_wait_ms=max_wait_ms, enabled=batching, max_queue=limits.max_queue,
                  max_queue_s=limits.max_queue_s)
    encoder = MicroBatcher(engine.encode, short_calls, max_batch=max_batch, name="encode", **common)
    generator = MicroBatcher(engine.similar, generation, max_batch=max_batch_rows, name="similar", **common)
    searcher = MicroBatcher(engine.search, short_calls, max_batch=max_batch, name="search", **common)
    identity = model.identity()
    seed_ids = itertools.count()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for b in (encoder, generator, searcher):
            await b.aclose()

    app = FastAPI(
        title="rosim",
        version="0.1.0",
        summary="RoFormer-Sim: encode, compare, generate and retrieve similar Chinese sentences.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger UI and ReDoc load their scripts from a CDN: blank offline
        redoc_url=None,
    )
    app.state.limits, app.state.model, app.state.index = limits, model, index
    app.state.batchers = {"encode": encoder, "similar": generator, "search": searcher}

    # ------------------------------------------------------------------ auth
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    async def check_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                        key: str | None = Depends(header_key)) -> None:
        # _Gate has already checked the headers before reading the body; this declares the scheme in
        # the OpenAPI document (the "Authorize" button of /docs) and checks again.
        given = key if key is not None else credentials.credentials if credentials is not None else None
        failure = _auth_failure(given, api_key)
        if failure is not None:
            raise failure

    guarded = [Depends(check_key)] if api_key else []

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if request.method == "POST" and not (media == "application/json" or media.endswith("+json")):
            return _error(415, "unsupported_media_type", "send the body as JSON with 'Content-Type: "
                          f"application/json' (got {content_type or 'no Content-Type'!r})")
        status, message, details = _describe_validation(exc.errors())
        return _error(status, "malformed_json" if status == 400 else "validation_error", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed"}
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI's own body-parsing failure (e.g. bytes that are not UTF-8)
            message = f"could not parse the body as UTF-8 JSON ({message})"
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), message,
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return _error(422, "invalid_input", str(exc))

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull):
        return _error(503, "busy", str(exc), headers={"Retry-After": str(int(exc.retry_after_s))})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    async def run(batcher: MicroBatcher, key, items, cost=None):
        try:
            return await asyncio.wait_for(batcher.submit(key, items, cost), limits.request_timeout_s)
        except TimeoutError:
            raise ApiError(504, "timeout", f"no result within {limits.request_timeout_s:g} s; the server is "
                           "overloaded or the request is too large") from None

    def as_list(texts: str | list[str]) -> list[str]:
        return [texts] if isinstance(texts, str) else list(texts)

    # ------------------------------------------------------------------ endpoints
    @app.post("/encode", response_model=EncodeResponse, responses=_ERRORS, dependencies=guarded, tags=["model"])
    async def encode(body: req.EncodeRequest) -> EncodeResponse:
        """Sentence vectors (the model's pooler output), one per text."""
        vecs = np.stack(await run(encoder, "encode", body.texts))
        if body.normalize:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return EncodeResponse(dim=int(vecs.shape[1]), embeddings=vecs.astype(np.float32).tolist())

    async def cosines(a: list[str], b: list[str]) -> tuple[np.ndarray, np.ndarray]:
        unique, rows_a, rows_b = unique_texts(a, b)
        vecs = np.stack(await run(encoder, "encode", unique))
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return vecs[rows_a], vecs[rows_b]

    @app.post("/similarity", response_model=SimilarityResponse, responses=_ERRORS, dependencies=guarded,
              tags=["model"])
    async def similarity(body: req.SimilarityRequest) -> SimilarityResponse:
        """Cosine similarity of every text of ``a`` with every text of ``b``: a number for two strings,
        a list for a string and a list, a matrix (one row per text of ``a``) for two lists."""
        va, vb = await cosines(as_list(body.a), as_list(body.b))
        scores = scores_by_forms(va.astype(float), vb.astype(float), a_single=isinstance(body.a, str),
                                 b_single=isinstance(body.b, str))
        return SimilarityResponse(scores=scores if isinstance(scores, float) else scores.tolist())

    @app.post("/similarity/pairwise", response_model=PairwiseResponse, responses=_ERRORS, dependencies=guarded,
              tags=["model"])
    async def similarity_pairwise(body: req.PairwiseRequest) -> PairwiseResponse:
        """One cosine per pair ``(a[i], b[i])`` of two equal-length lists."""
        va, vb = await cosines(body.a, body.b)
        return PairwiseResponse(scores=[float(s) for s in np.einsum("ij,ij->i", va, vb)])

    @app.post("/similar", response_model=SimilarResponse, responses=_ERRORS, dependencies=guarded,
              tags=["model"])
    async def similar(body: req.SimilarRequest) -> SimilarResponse:
        """Generate ``n`` candidates per text, drop duplicates and copies of the input, keep the ``k`` most
        similar. Requests with the same ``n``, ``top_p`` and ``max_new_tokens`` are generated together."""
        texts = body.items
        seed = None if body.seed is None else (body.seed, next(seed_ids))  # unique key: runs alone
        key = ("similar", body.n, body.top_p, body.max_new_tokens, seed)
        found = await run(generator, key, texts, cost=len(texts) * body.n)
        return SimilarResponse(results=[
            {"text": t, "similar": [{"text": s, "score": v} for s, v in f[:body.k]]}
            for t, f in zip(texts, found, strict=True)
        ])

    @app.post("/search", response_model=SearchResponse, responses={**_ERRORS, 404: {
        "model": ErrorResponse, "description": "no index is loaded"}}, dependencies=guarded, tags=["model"])
    async def search(body: req.SearchRequest) -> SearchResponse:
        """Nearest neighbours of each text among the sentences of the loaded index."""
        if index is None:
            raise ApiError(404, "no_index", "no index is loaded: start the server with --index DIR")
        texts = as_list(body.texts)
        found = await run(searcher, "search", [(t, body.k) for t in texts])
        return SearchResponse(results=[
            {"text": t, "neighbors": [{"text": s, "score": float(v)} for s, v in f]}
            for t, f in zip(texts, found, strict=True)
        ])

    started = time.time()

    @app.get("/health", tags=["service"])
    async def health() -> dict:
        """Liveness, the loaded model and index, limits and batching counters (never needs a key)."""
        return {
            "status": "ok",
            "uptime_s": round(time.time() - started, 1),
            "model": identity,
            "index": _index_info(index),
            "auth_required": bool(api_key),
            "limits": limits.as_dict(),
            "batching": {"enabled": batching, "max_batch": max_batch, "max_batch_rows": max_batch_rows,
                         "max_wait_ms": max_wait_ms,
                         **{name: {**b.stats.as_dict(), "queued": b.queued} for name, b in app.state.batchers.items()}},
        }

    @app.get("/", include_in_schema=False)
    async def demo() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        """The API described from openapi.json by a page with no external script (works offline)."""
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    routes = {"/encode": encoder, "/similarity": encoder, "/similar": generator}
    if index is not None:
        routes["/search"] = searcher

    def shed(path: str) -> QueueFull | None:
        batcher = routes.get(path)
        return None if batcher is None else batcher.refusal()

    app.add_middleware(_Gate, max_bytes=limits.max_body_bytes, api_key=api_key, body_timeout_s=limits.body_timeout_s,
                       shed=shed)
    return app
