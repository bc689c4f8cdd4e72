"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) but not a client that opens a
connection and sends its request line and headers slowly, or never finishes them: such a
connection is held open for as long as the client likes. :func:`header_timeout_protocol` returns a
protocol class that closes a connection whose request headers are not complete ``seconds`` after it
opened, or after the previous response on it was sent. (The body has its own deadline, in the app:
``Limits.body_timeout_s``.)
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeaderDeadline(H11Protocol):
    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        # their_state stays IDLE until a whole request line and headers have been parsed
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers did not arrive within %g s",
                             self.header_timeout_s)
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.run(..., http=...)`` with a ``seconds`` header deadline."""
    if not seconds > 0:
        raise ValueError(f"the header timeout must be positive, got {seconds}")
    return type("HeaderDeadlineH11Protocol", (_HeaderDeadline,), {"header_timeout_s": float(seconds)})
