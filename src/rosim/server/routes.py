"""The endpoints: model calls (``/encode``, ``/similarity``, ``/similar``, ``/search``) and the
service pages (``/health``, ``/``, ``/docs``)."""

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from rosim.inference.common import scores_by_forms, unique_texts
from rosim.server.admission import ModelQueues
from rosim.server.errors import ERROR_RESPONSES, ApiError
from rosim.server.schemas import (
    EncodeResponse,
    ErrorResponse,
    PairwiseResponse,
    SearchResponse,
    SimilarityResponse,
    SimilarResponse,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"


def _as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def add_model_routes(app: FastAPI, queues: ModelQueues, req, index, dependencies: list) -> None:
    """The POST endpoints; ``req`` holds the request models built for the server's limits."""
    seed_ids = itertools.count()
    post = dict(responses=ERROR_RESPONSES, dependencies=dependencies, tags=["model"])

    @app.post("/encode", response_model=EncodeResponse, **post)
    async def encode(body: req.EncodeRequest) -> EncodeResponse:
        """Sentence vectors (the model's pooler output), one per text."""
        vecs = np.stack(await queues.run(queues.encode, "encode", body.texts))
        if body.normalize:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return EncodeResponse(dim=int(vecs.shape[1]), embeddings=vecs.astype(np.float32).tolist())

    async def cosines(a: list[str], b: list[str]) -> tuple[np.ndarray, np.ndarray]:
        unique, rows_a, rows_b = unique_texts(a, b)
        vecs = np.stack(await queues.run(queues.encode, "encode", unique))
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return vecs[rows_a], vecs[rows_b]

    @app.post("/similarity", response_model=SimilarityResponse, **post)
    async def similarity(body: req.SimilarityRequest) -> SimilarityResponse:
        """Cosine similarity of every text of ``a`` with every text of ``b``: a number for two strings,
        a list for a string and a list, a matrix (one row per text of ``a``) for two lists."""
        va, vb = await cosines(_as_list(body.a), _as_list(body.b))
        scores = scores_by_forms(va.astype(float), vb.astype(float), a_single=isinstance(body.a, str),
                                 b_single=isinstance(body.b, str))
        return SimilarityResponse(scores=scores if isinstance(scores, float) else scores.tolist())

    @app.post("/similarity/pairwise", response_model=PairwiseResponse, **post)
    async def similarity_pairwise(body: req.PairwiseRequest) -> PairwiseResponse:
        """One cosine per pair ``(a[i], b[i])`` of two equal-length lists."""
        va, vb = await cosines(body.a, body.b)
        return PairwiseResponse(scores=[float(s) for s in np.einsum("ij,ij->i", va, vb)])

    @app.post("/similar", response_model=SimilarResponse, **post)
    async def similar(body: req.SimilarRequest) -> SimilarResponse:
        """Generate ``n`` candidates per text, drop duplicates and copies of the input, keep the ``k`` most
        similar. Requests with the same ``n``, ``top_p`` and ``max_new_tokens`` are generated together."""
        texts = body.items
        seed = None if body.seed is None else (body.seed, next(seed_ids))  # unique key: runs alone
        key = ("similar", body.n, body.top_p, body.max_new_tokens, seed)
        found = await queues.run(queues.similar, key, texts, cost=len(texts) * body.n)
        return SimilarResponse(results=[
            {"text": t, "similar": [{"text": s, "score": v} for s, v in f[:body.k]]}
            for t, f in zip(texts, found, strict=True)
        ])

    no_index = {404: {"model": ErrorResponse, "description": "no index is loaded"}}

    @app.post("/search", response_model=SearchResponse, **{**post, "responses": {**ERROR_RESPONSES, **no_index}})
    async def search(body: req.SearchRequest) -> SearchResponse:
        """Nearest neighbours of each text among the sentences of the loaded index."""
        if index is None:
            raise ApiError(404, "no_index", "no index is loaded: start the server with --index DIR")
        texts = _as_list(body.texts)
        found = await queues.run(queues.search, "search", [(t, body.k) for t in texts])
        return SearchResponse(results=[
            {"text": t, "neighbors": [{"text": s, "score": float(v)} for s, v in f]}
            for t, f in zip(texts, found, strict=True)
        ])


def add_service_routes(app: FastAPI, *, identity: dict, index, auth_required: bool, limits, queues: ModelQueues,
                       generation) -> None:
    """``/health``, the demo page at ``/``, ``/docs`` (no CDN) and ``/static``."""
    started = time.time()

    @app.get("/health", tags=["service"])
    async def health() -> dict:
        """Liveness, the loaded model and index, limits, batching counters and the generation process
        (never needs a key)."""
        return {
            "status": "ok",
            "uptime_s": round(time.time() - started, 1),
            "model": identity,
            "index": index_info(index),
            "auth_required": auth_required,
            "limits": limits.as_dict(),
            "batching": queues.health(),
            "generation": {"mode": "thread"} if generation is None else {"mode": "process", **generation.health()},
        }

    @app.get("/", include_in_schema=False)
    async def demo() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        """The API described from openapi.json by a page with no external script (works offline)."""
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def index_info(index) -> dict | None:
    """What /health says of the loaded index: its type, kind and size where it tells them."""
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
