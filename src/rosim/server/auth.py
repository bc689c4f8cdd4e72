"""The API key: checked once per POST, by :class:`~rosim.server.intake.RequestIntake`, before the body is
read; the routes only declare the two ways of sending it, for the OpenAPI document."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from rosim.errors import InputError
from rosim.server.errors import ApiError

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class ApiKey:
    """The key a server requires: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""

    def __init__(self, key: str):
        if not key:
            raise InputError("api_key must be a non-empty string (or None for no key)")
        self._key = key.encode("utf-8")

    def refusal(self, headers: Mapping[str, str]) -> ApiError | None:
        """The 401 for a request with these (lower-cased) headers, or None when it carries the key."""
        given = self.given(headers)
        if given is None:
            return ApiError(401, "unauthorized", "this server needs an API key: send 'Authorization: Bearer KEY' "
                            "or 'X-API-Key: KEY'", _CHALLENGE)
        if not hmac.compare_digest(given.encode("latin-1", "replace"), self._key):
            return ApiError(401, "unauthorized", "wrong API key", _CHALLENGE)
        return None

    @staticmethod
    def given(headers: Mapping[str, str]) -> str | None:
        """The key a request sends: X-API-Key first, else a Bearer token."""
        if "x-api-key" in headers:
            return headers["x-api-key"]
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        return None


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")


async def _declare_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                       key: str | None = Depends(_header)) -> None:
    """Declares the two schemes (the "Authorize" button of /docs); checks nothing: the intake did."""


def key_schemes(api_key: ApiKey | None) -> list:
    """Route dependencies that document the key in the OpenAPI document, when the server has one."""
    return [Depends(_declare_key)] if api_key is not None else []
