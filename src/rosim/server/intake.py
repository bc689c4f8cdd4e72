"""ASGI middleware that takes in a POST before the app sees it: the API key, the body's size and
deadline, load shedding, and the client's connection watched for a disconnect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from rosim.server.auth import ApiKey
from rosim.server.batching import QueueFull
from rosim.server.errors import busy_response, error_response


class RequestIntake:
    """Before a POST body is read: refuse a missing or wrong API key (401), then a body over
    ``max_bytes`` (413, by Content-Length or by counting), or one that takes longer than
    ``body_timeout_s`` to arrive (408); then, with the body in hand but not yet parsed, answer 503 when
    ``shed(path)`` says the endpoint's queue is full. The body is then replayed to the app, and the
    connection is watched: when the client disconnects before its answer, the app's handling is
    cancelled (so queued or running model work for it is dropped)."""

    def __init__(self, app, max_bytes: int, api_key: ApiKey | None = None, body_timeout_s: float = 10.0,
                 shed: Callable[[str], QueueFull | None] | None = None):
        self.app, self.max_bytes, self.api_key, self.body_timeout_s = app, max_bytes, api_key, body_timeout_s
        self.shed = shed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        if self.api_key is not None and (refused := self.api_key.refusal(headers)) is not None:
            response = error_response(refused.status, refused.code, refused.message, headers=refused.headers)
            return await response(scope, receive, send)
        body = await self._read_body(scope, receive, send, headers)
        if body is None:  # already answered, or the client left
            return
        busy = self.shed(scope.get("path", "")) if self.shed is not None else None
        if busy is not None:  # overloaded: answer before spending time on parsing and validation
            return await busy_response(busy)(scope, receive, send)
        return await self._run_watched(scope, receive, send, body)

    async def _read_body(self, scope, receive, send, headers: dict[str, str]) -> bytes | None:
        try:
            declared = int(headers.get("content-length", "-1"))
        except ValueError:
            declared = -1
        if declared > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                response = error_response(408, "request_timeout", f"the request body did not arrive within "
                                          f"{self.body_timeout_s:g} s", headers={"Connection": "close"})
                return await response(scope, receive, send)
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

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

    async def _too_large(self, scope, receive, send) -> None:
        response = error_response(413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes")
        await response(scope, receive, send)
