"""Admission limits of the router: bounded queue, prompt length, request timeout, body size and
the time a client may take to send its request.

- `AdmissionConfig`: the limits, validated where built (`zipserve serve` flags map onto it); the
  header and body read timeouts are enforced by router/read_timeouts.py.
- `AdmissionGate`: counts the prompt tokens and jobs that were accepted but have not finished
  their prefill yet (waiting for decode pages, queued at or running on a prefill worker). A job
  that would take either count past its limit is refused with 429 + Retry-After before anything
  is started, so a load spike never becomes an unbounded wait.
- `BodySizeLimit`: a pure ASGI middleware answering 413 to a request body over the limit,
  whether announced by Content-Length or found while streaming it in.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zipserve.router.backend import Job
from zipserve.router.errors import OpenAIError


@dataclass(frozen=True)
class AdmissionConfig:
    """Limits applied to every request."""

    max_queued_tokens: int = 65536
    """Prompt tokens of accepted jobs not yet prefilled (router-wide); beyond it: 429."""
    max_queued_jobs: int = 512
    """Accepted jobs not yet prefilled; beyond it: 429."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (400 naming the prompt field); None: only the model's context."""
    request_timeout_s: float = 600.0
    """A job still running after this long fails with a timeout error and frees its pages;
    a request's own `timeout` field may ask for less, never more."""
    max_body_bytes: int = 1 << 20
    """Largest request body (413 beyond it)."""
    retry_after_s: int = 1
    """The Retry-After header of a 429."""
    header_timeout_s: float = 10.0
    """A connection must deliver a request's complete headers within this many seconds of
    opening (or of the previous response ending), else it is answered 408 and closed."""
    body_timeout_s: float = 30.0
    """A request's whole body must arrive within this many seconds of its headers, else 408
    and the connection is closed."""

    def __post_init__(self) -> None:
        if self.max_queued_tokens < 1:
            raise ValueError(f"max_queued_tokens: must be >= 1, got {self.max_queued_tokens}")
        if self.max_queued_jobs < 1:
            raise ValueError(f"max_queued_jobs: must be >= 1, got {self.max_queued_jobs}")
        if self.max_prompt_tokens is not None:
            if self.max_prompt_tokens < 1:
                raise ValueError(f"max_prompt_tokens: must be >= 1, got {self.max_prompt_tokens}")
            if self.max_prompt_tokens > self.max_queued_tokens:
                raise ValueError(
                    f"max_prompt_tokens ({self.max_prompt_tokens}) must not exceed "
                    f"max_queued_tokens ({self.max_queued_tokens}): such a prompt "
                    f"could never be admitted"
                )
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s: must be > 0, got {self.request_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes: must be >= 1024, got {self.max_body_bytes}")
        if self.retry_after_s < 1:
            raise ValueError(f"retry_after_s: must be >= 1, got {self.retry_after_s}")
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"{name}: must be a finite number > 0, got {value}")

    def timeout_for(self, requested: float | None) -> float:
        """The timeout of one request: its own `timeout` field when given (and allowed)."""
        if requested is None:
            return self.request_timeout_s
        if requested > self.request_timeout_s:
            raise OpenAIError(
                400,
                f"timeout: {requested} s is more than this server allows "
                f"({self.request_timeout_s} s)",
                param="timeout",
            )
        return float(requested)

    def check_prompt(self, prompt_len: int, param: str) -> None:
        if self.max_prompt_tokens is not None and prompt_len > self.max_prompt_tokens:
            raise OpenAIError(
                400,
                f"{param}: the prompt has {prompt_len} tokens; this server "
                f"accepts at most {self.max_prompt_tokens}",
                param=param,
                code="prompt_too_long",
            )


class QueueTicket:
    """One job's place in the queue; `leave()` (idempotent) gives it back."""

    def __init__(self, gate: AdmissionGate, tokens: int) -> None:
        self._gate = gate
        self.tokens = tokens
        self.active = True

    def leave(self) -> None:
        if self.active:
            self.active = False
            self._gate._release(self)


class AdmissionGate:
    """The router-wide count of queued prompt tokens and jobs (used on the event loop only)."""

    def __init__(self, cfg: AdmissionConfig) -> None:
        self.cfg = cfg
        self.queued_tokens = 0
        self.queued_jobs = 0
        self.rejected = 0
        """Requests refused with 429 so far."""

    def enter(self, job: Job) -> QueueTicket:
        """A ticket for `job`, or a 429 OpenAIError when the queue is full."""
        n = len(job.prompt_ids)
        if self.queued_jobs + 1 > self.cfg.max_queued_jobs:
            self._refuse(
                f"the queue holds {self.queued_jobs} requests waiting for prefill "
                f"(limit {self.cfg.max_queued_jobs})"
            )
        if self.queued_tokens + n > self.cfg.max_queued_tokens:
            self._refuse(
                f"the queue holds {self.queued_tokens} prompt tokens waiting for "
                f"prefill and this request adds {n} (limit "
                f"{self.cfg.max_queued_tokens})"
            )
        self.queued_tokens += n
        self.queued_jobs += 1
        return QueueTicket(self, n)

    def _refuse(self, why: str) -> None:
        self.rejected += 1
        raise OpenAIError(
            429,
            f"server busy: {why}; retry after {self.cfg.retry_after_s} s",
            code="queue_full",
            headers={"Retry-After": str(self.cfg.retry_after_s)},
        )

    def _release(self, ticket: QueueTicket) -> None:
        self.queued_tokens -= ticket.tokens
        self.queued_jobs -= 1

    def stats(self) -> dict:
        return {
            "queued_tokens": self.queued_tokens,
            "queued_jobs": self.queued_jobs,
            "max_queued_tokens": self.cfg.max_queued_tokens,
            "max_queued_jobs": self.cfg.max_queued_jobs,
            "rejected_429": self.rejected,
        }


class BodySizeLimit:
    """413 in OpenAI format for a request body larger than `max_bytes`: refused up front when
    Content-Length announces it, else raised (as an `OpenAIError`, which the app's handler
    answers) as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> OpenAIError:
        return OpenAIError(
            413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if (
                name.lower() == b"content-length"
                and value.strip().isdigit()
                and int(value) > self.max_bytes
            ):
                await self._error().response()(scope, receive, send)
                return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, counted_receive, send)
