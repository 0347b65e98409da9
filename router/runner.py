"""One job in flight: a task pumps the backend's event stream into the job's record and a queue.

Decoupling the backend stream from the HTTP response lets the response side wait for the next
token with a timeout (to poll for a client that went away) without ever cancelling the backend's
iterator mid-step. `close()` is the single exit: idempotent, safe to call from a `finally` under
cancellation, and when the job has not finished it marks it ABORTED, calls `backend.abort` and
stops the pump.

Admission: the job's `QueueTicket` (router/limits.py) is handed back once its prefill is over
(a phase after prefill, a token, or the end). A job with `timeout_s` still running that long
after its arrival is stopped: its backend stream is closed (which frees what it holds), the
backend is told to abort it, and it finishes with a "timeout:" error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import anyio

from zipserve.router.backend import Backend, FinishEvent, Job, PhaseEvent, TokenEvent
from zipserve.router.jobs import JobRecord
from zipserve.router.limits import QueueTicket

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 5.0
"""How long `close()` waits for `backend.abort` and for the pump to stop."""

PAST_PREFILL = frozenset({"encode", "transfer", "decode_queue", "decode"})
"""Phases that mean a job no longer waits for (or runs in) prefill."""


def timeout_message(timeout_s: float) -> str:
    return f"timeout: the request did not finish within {timeout_s:g} s"


class JobRun:
    """Pumps `backend.stream(job)` into `record` and a queue of token / finish events."""

    def __init__(
        self,
        backend: Backend,
        job: Job,
        record: JobRecord,
        on_closed: Callable[[JobRun], None] | None = None,
        ticket: QueueTicket | None = None,
    ) -> None:
        self.backend = backend
        self.job = job
        self.record = record
        self._on_closed = on_closed
        self._ticket = ticket
        self._queue: asyncio.Queue[TokenEvent | FinishEvent] = asyncio.Queue()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(
            self._pump(), name=f"zipserve-job-{job.id}"
        )

    @property
    def finished(self) -> bool:
        return self.record.state.terminal

    def _leave_queue(self) -> None:
        if self._ticket is not None:
            self._ticket.leave()

    async def _pump(self) -> None:
        stream = self.backend.stream(self.job)
        timeout_s = self.job.timeout_s
        left = None if timeout_s is None else max(0.0, self.job.arrival + timeout_s - time.time())
        try:
            with anyio.move_on_after(left) as scope:
                async for ev in stream:
                    now = time.time()
                    if isinstance(ev, PhaseEvent):
                        self.record.on_phase(ev)
                        if ev.name in PAST_PREFILL or (ev.name == "prefill" and ev.end):
                            self._leave_queue()
                    elif isinstance(ev, TokenEvent):
                        self._leave_queue()
                        self.record.on_token(ev, now)
                        self._queue.put_nowait(ev)
                    elif isinstance(ev, FinishEvent):
                        self._finish(ev)
                        return
                    else:
                        log.warning("job %s: ignoring unknown backend event %r", self.job.id, ev)
            if scope.cancelled_caught and timeout_s is not None:
                await self._time_out(stream, timeout_s)
                return
            self._finish(
                FinishEvent(reason="error", error="the backend stream ended without a finish event")
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the backend's own failure: the job fails, the router lives
            log.exception("job %s: backend stream raised", self.job.id)
            self._finish(FinishEvent(reason="error", error=f"backend error: {exc}"))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    async def _time_out(self, stream, timeout_s: float) -> None:
        """Close the stream (its cleanup frees the job's pages), abort the job in the backend
        too, then finish it with the timeout error."""
        with anyio.CancelScope(shield=True):
            aclose = getattr(stream, "aclose", None)
            try:
                if aclose is not None:
                    with anyio.fail_after(ABORT_TIMEOUT_S):
                        await aclose()
                with anyio.fail_after(ABORT_TIMEOUT_S):
                    await self.backend.abort(self.job.id)
            except Exception:
                log.exception("job %s: cleanup after its timeout failed", self.job.id)
        self._finish(FinishEvent(reason="error", error=timeout_message(timeout_s)))

    def _finish(self, ev: FinishEvent) -> None:
        self._leave_queue()
        self.record.on_finish(ev, time.time())
        self._queue.put_nowait(ev)

    async def next_event(self, timeout: float | None = None) -> TokenEvent | FinishEvent | None:
        """The next token or the finish event; None if `timeout` passed first."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def close(self, reason: str = "client disconnected") -> None:
        """End the job: if it has not finished, mark it ABORTED and abort it in the backend."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                if not self.record.state.terminal:
                    self.record.abort(reason, time.time())
                    try:
                        with anyio.fail_after(ABORT_TIMEOUT_S):
                            await self.backend.abort(self.job.id)
                    except Exception:
                        log.exception("job %s: backend.abort failed", self.job.id)
                if not self._task.done():
                    self._task.cancel()
                    await asyncio.wait({self._task}, timeout=ABORT_TIMEOUT_S)
            finally:
                self._leave_queue()
                if self._on_closed is not None:
                    self._on_closed(self)
