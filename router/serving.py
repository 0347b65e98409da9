"""Serving one admitted job over HTTP: start it, then answer as one JSON body or as SSE chunks.

While waiting for the backend, the response side wakes every `DISCONNECT_POLL_S` to ask whether
the client is still there; when it is gone, the job is closed, which aborts it in the backend.
Streaming responses are also closed by `SSEResponse` whenever they end, so a disconnect noticed
by the server (a failed send, Starlette's disconnect listener, a cancelled task) aborts the job
just the same.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from zipserve.router.backend import Backend, FinishEvent, Job, TokenEvent
from zipserve.router.errors import backend_error
from zipserve.router.formats import ResponseFormat
from zipserve.router.jobs import JobRecord, JobRegistry
from zipserve.router.limits import AdmissionConfig, AdmissionGate
from zipserve.router.runner import JobRun
from zipserve.router.schemas import ErrorResponse, PromptTokensDetails, Usage
from zipserve.router.sse import DONE, SSEResponse, sse_event

DISCONNECT_POLL_S = 0.1
"""How often a response waiting on the backend checks for a vanished client."""

JOB_ID_HEADER = "x-zipserve-job-id"


@dataclass
class RouterState:
    """The router's shared state: the backend, the job history, the jobs in flight, the
    admission limits and queue."""

    backend: Backend
    registry: JobRegistry
    limits: AdmissionConfig = field(default_factory=AdmissionConfig)
    gate: AdmissionGate = field(init=False)
    started: float = field(default_factory=time.time)
    active: dict[str, JobRun] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gate = AdmissionGate(self.limits)

    def start(self, job: Job, endpoint: str) -> JobRun:
        """Queue and start `job`; a 429 OpenAIError (nothing started) when the queue is full."""
        ticket = self.gate.enter(job)
        record = JobRecord.for_job(job, endpoint=endpoint, model=self.backend.model_name)
        self.registry.add(record)
        run = JobRun(self.backend, job, record, on_closed=self._forget, ticket=ticket)
        self.active[job.id] = run
        return run

    def _forget(self, run: JobRun) -> None:
        self.active.pop(run.job.id, None)

    async def shutdown(self) -> None:
        """Abort every job still in flight."""
        for run in list(self.active.values()):
            await run.close("router shutting down")


def usage_of(record: JobRecord) -> Usage:
    details = (
        None
        if record.cached_tokens is None
        else PromptTokensDetails(cached_tokens=record.cached_tokens)
    )
    return Usage(
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        total_tokens=record.prompt_tokens + record.completion_tokens,
        prompt_tokens_details=details,
    )


class ClientWatch:
    """Asks the server whether the client is gone, at most once per `DISCONNECT_POLL_S`."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self._next_check = time.monotonic() + DISCONNECT_POLL_S

    async def gone(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + DISCONNECT_POLL_S
        return await self.request.is_disconnected()


async def next_or_gone(run: JobRun, watch: ClientWatch) -> TokenEvent | FinishEvent | None:
    """The job's next token or finish; None once the client has disconnected (checked while
    idle and between tokens, so a steady token stream does not hide a disconnect)."""
    while True:
        ev = await run.next_event(DISCONNECT_POLL_S)
        if await watch.gone():
            return None
        if ev is not None:
            return ev


async def respond(
    state: RouterState,
    request: Request,
    job: Job,
    fmt: ResponseFormat,
    *,
    stream: bool,
    include_usage: bool = False,
) -> Response:
    run = state.start(job, fmt.endpoint)
    headers = {JOB_ID_HEADER: job.id}
    if stream:
        return SSEResponse(
            _sse_body(run, request, fmt, include_usage), on_close=run.close, headers=headers
        )
    try:
        return await _whole(run, request, fmt, headers)
    finally:
        await run.close()


async def _whole(
    run: JobRun, request: Request, fmt: ResponseFormat, headers: dict[str, str]
) -> Response:
    parts: list[str] = []
    tokens: list[TokenEvent] = []  # kept only for logprobs and token ids
    keep = fmt.token_strings is not None or fmt.token_ids
    watch = ClientWatch(request)
    while True:
        ev = await next_or_gone(run, watch)
        if ev is None:
            await run.close("client disconnected")
            return Response(status_code=499, headers=headers)  # nobody is listening
        if isinstance(ev, FinishEvent):
            break
        parts.append(ev.text)
        if keep:
            tokens.append(ev)
    if ev.reason == "error":
        return backend_error(ev.error, headers, client_error=ev.client_error).response()
    body = fmt.whole("".join(parts), ev.reason, usage_of(run.record), tokens)
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)


async def _sse_body(
    run: JobRun, request: Request, fmt: ResponseFormat, include_usage: bool
) -> AsyncIterator[bytes]:
    first = fmt.first_chunk()
    if first is not None:
        yield sse_event(first)
    watch = ClientWatch(request)
    per_token = fmt.token_strings is not None or fmt.token_ids
    while True:
        ev = await next_or_gone(run, watch)
        if ev is None:
            return  # client gone: SSEResponse closes the run, which aborts the job
        if isinstance(ev, FinishEvent):
            break
        # One chunk per token, text or not (a token that ends inside a UTF-8 character, or a
        # server without a tokenizer, has none yet): clients time every token, not every text.
        yield sse_event(fmt.delta_chunk(ev.text, [ev] if per_token else ()))
    if ev.reason == "error":
        yield sse_event(
            ErrorResponse(error=backend_error(ev.error, client_error=ev.client_error).detail())
        )
    else:
        yield sse_event(fmt.final_chunk(ev.reason))
        if include_usage:
            yield sse_event(fmt.usage_chunk(usage_of(run.record)))
    yield DONE
