"""Every error the API answers, as ``{"error": {"code", "message", "details"}}`` with its status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rosim.errors import InputError
from rosim.server.batching import QueueFull
from rosim.server.schemas import ErrorResponse

log = logging.getLogger("rosim.server")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, details: list | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def busy_response(exc: QueueFull) -> JSONResponse:
    """503 + Retry-After: the model's queue is full, or generation is (re)starting."""
    return error_response(503, exc.code, str(exc), headers={"Retry-After": str(int(exc.retry_after_s))})


# the error answers every model endpoint declares in the OpenAPI document
ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "malformed JSON"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key (when the server has one)"},
    408: {"model": ErrorResponse, "description": "the request body did not arrive in time"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    415: {"model": ErrorResponse, "description": "the body is not sent as application/json"},
    422: {"model": ErrorResponse, "description": "a field is missing, of the wrong type or beyond a limit"},
    503: {"model": ErrorResponse, "description": "too much work is waiting for the model (or generation is "
          "restarting); retry after the Retry-After header's seconds"},
    504: {"model": ErrorResponse, "description": "the request waited longer than the server's timeout"},
}


def describe_validation(errors) -> tuple[int, str, list[dict]]:
    """pydantic's validation errors as (status, one-line message, details): 400 for JSON that does not
    parse, 422 for a field that is missing, of the wrong type or beyond a limit."""
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
    problems = [f"{'.'.join(d['loc'])}: {d['msg']}" if d["loc"] else d["msg"] for d in details[:5]]
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return 422, "; ".join(problems) + more, details


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception that reaches the app in the one error format."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if request.method == "POST" and not (media == "application/json" or media.endswith("+json")):
            return error_response(415, "unsupported_media_type", "send the body as JSON with 'Content-Type: "
                                  f"application/json' (got {content_type or 'no Content-Type'!r})")
        status, message, details = describe_validation(exc.errors())
        return error_response(status, "malformed_json" if status == 400 else "validation_error", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed"}
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI's own body-parsing failure (e.g. bytes that are not UTF-8)
            message = f"could not parse the body as UTF-8 JSON ({message})"
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), message,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return error_response(422, "invalid_input", str(exc))

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull):
        return busy_response(exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")
