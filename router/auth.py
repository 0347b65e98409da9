"""Optional bearer-token check for every route except the open ones (by default /health, which
answers a minimal status without the key and its details with it: `has_key`).

A pure ASGI middleware, so unauthenticated requests are refused before their body is read or
parsed. Keys are compared with `hmac.compare_digest`. `read_api_key` takes the key from
`zipserve serve`'s --api-key or --api-key-file.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from zipserve.router.errors import OpenAIError

OPEN_PATHS = frozenset({"/health"})


def read_api_key(key: str | None, key_file: str | None) -> str | None:
    """--api-key or the first line of --api-key-file (not both); an empty key is an error."""
    if key is not None and key_file is not None:
        raise ValueError("--api-key and --api-key-file: give one, not both")
    if key_file is not None:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file: cannot read {key_file}: {e.strerror}") from None
    if key is not None and not key.strip():
        raise ValueError("--api-key: the key is empty")
    return key


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

    def __init__(
        self, app: ASGIApp, *, api_key: str, open_paths: frozenset[str] = OPEN_PATHS
    ) -> None:
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
        message = (
            "missing API key: send 'Authorization: Bearer <key>'"
            if token is None
            else "invalid API key"
        )
        error = OpenAIError(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await error.response()(scope, receive, send)
