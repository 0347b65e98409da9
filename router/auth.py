"""Optional bearer-token check for every route except the open ones (by default /health, which
answers a minimal status without the key and its details with it: `has_key`).

A pure ASGI middleware, so unauthenticated requests are refused before their body is read or
parsed. Keys are compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send
from zipserve.router.errors import OpenAIError

OPEN_PATHS = frozenset({"/health"})


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def has_key(headers: list[tuple[bytes, bytes]], api_key: str | None) -> bool:
    """Whether the request may see what the key guards: no key is configured, or it carries
    the key (compared in constant time)."""
    if api_key is None:
        return True
    token = bearer_token(headers)
    return token is not None and hmac.compare_digest(token, api_key.encode())


class ApiKeyMiddleware:
    """401 in OpenAI format unless the request carries `Authorization: Bearer <api_key>`."""

    def __init__(self, app: ASGIApp, *, api_key: str,
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not api_key:
            raise ValueError("api_key: must be non-empty")
        self.app = app
        self._key = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        if token is not None and hmac.compare_digest(token, self._key):
            await self.app(scope, receive, send)
            return
        message = ("missing API key: send 'Authorization: Bearer <key>'" if token is None
                   else "invalid API key")
        error = OpenAIError(401, message, code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)
