"""When a request reached the router: stamped by the outermost middleware, before the body is
read, JSON-parsed, validated and tokenized, so a job's `arrival` (where its queue phase, TTFT
and JCT start) leaves out none of the router's own work. A long prompt sent as a token-id list
is ~100 KB of JSON; reading and parsing it is router time the client waits for.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

ARRIVAL_KEY = "zipserve_arrival"


class ArrivalStampMiddleware:
    """Pure ASGI: puts `time.time()` in the request state as soon as the app is called."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[ARRIVAL_KEY] = time.time()
        await self.app(scope, receive, send)


def arrival_of(request: Request) -> float:
    """The stamp of ArrivalStampMiddleware (now, for an app built without it)."""
    return request.scope.get("state", {}).get(ARRIVAL_KEY) or time.time()
