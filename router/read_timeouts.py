"""How long a client may take to send its request: bounded for the headers and for the body.

uvicorn bounds neither: its keep-alive timeout stops as soon as any byte arrives, so a client
sending one header line a second (slowloris), or a body shorter than its Content-Length, holds a
connection (and, for the body, a request task) for as long as it likes.

- `HeaderTimeoutH11Protocol`: uvicorn's h11 protocol plus a timer armed when the connection
  opens and again when a response ends; unless the next request's headers are complete when
  it fires, the connection is closed, after a 408 (OpenAI error body) if part of a request had
  arrived (a connection that sent nothing is closed silently: a client reusing an idle
  keep-alive connection must not read a stale 408 as the answer to its next request).
- `BodyReadTimeout`: a pure ASGI middleware bounding the time from a request's headers to the
  last byte of its body; past it the request is answered 408 with `Connection: close` (the
  handler's `receive()` raises an `OpenAIError`, which the app's error handler answers).
- `uvicorn_options(limits)`: the keyword arguments for `uvicorn.run` / `uvicorn.Config` that
  serve with the header bound (h11, whose protocol this module extends, whether or not httptools
  is installed); the body bound is the app's own middleware (router/app.py installs it).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anyio
import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from zipserve.router.errors import OpenAIError
from zipserve.router.limits import AdmissionConfig


def _timeout_error(what: str, seconds: float) -> OpenAIError:
    return OpenAIError(
        408,
        f"request timeout: the {what} did not arrive within {seconds:g} s",
        code="request_timeout",
        type="invalid_request_error",
        headers={"Connection": "close"},
    )


def raw_408(seconds: float) -> bytes:
    """A complete HTTP/1.1 408 response (OpenAI error body) that closes the connection."""
    err = _timeout_error("request headers", seconds)
    body = json.dumps({"error": err.detail().model_dump()}).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header read timeout of `header_timeout_s` (a subclass per
    value: `with_header_timeout`)."""

    header_timeout_s: float = 10.0

    @classmethod
    def with_header_timeout(cls, seconds: float) -> type[HeaderTimeoutH11Protocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": float(seconds)})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._armed_cycle: object = None
        self._bytes_since_armed = False

    def _arm(self) -> None:
        self._disarm()
        self._armed_cycle = self.cycle
        self._bytes_since_armed = False
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.cycle is not self._armed_cycle and self.conn.their_state is not h11.IDLE:
            return  # a new request's headers did arrive (defensive: handle_events disarms)
        if (
            self._bytes_since_armed
            and self.conn.their_state is h11.IDLE
            and self.conn.our_state is h11.IDLE
        ):  # part of a request's headers came
            self.transport.write(raw_408(self.header_timeout_s))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._bytes_since_armed = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._armed_cycle:
            self._disarm()  # the headers of a new request are in: its body has its own bound

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # before super(): it may start a pipelined request, which disarms
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class BodyReadTimeout:
    """408 unless a request's body has fully arrived `timeout_s` after the app got its
    headers. Only the body is bounded: once it is in, `receive()` (a disconnect listener) waits
    as long as the app wants."""

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as scope_:
                message = await receive()
            if scope_.cancelled_caught:
                raise _timeout_error("request body", self.timeout_s)
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


def uvicorn_options(limits: AdmissionConfig | None = None) -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config keyword arguments: connections get
    `limits.header_timeout_s` to send their headers."""
    limits = limits or AdmissionConfig()
    return {"http": HeaderTimeoutH11Protocol.with_header_timeout(limits.header_timeout_s)}
