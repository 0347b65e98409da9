"""Job states, per-job timing records (phases, TTFT, time between tokens, JCT) and their registry.

A `JobRecord` is updated from the backend's events as they arrive; token and finish times are
the router's receive times (`time.time()`), so TTFT and JCT are what a client near the router
sees. Phase times come from the backend. The state only moves forward:

    PENDING -> PREFILLING -> TRANSFERRING -> DECODING -> DONE | FAILED | ABORTED

(queue: PENDING; prefill, encode: PREFILLING; transfer: TRANSFERRING; decode_queue, decode or a
first token: DECODING). Once terminal, later events are ignored.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from zipserve.router.backend import FinishEvent, Job, PhaseEvent, TokenEvent
from zipserve.router.schemas import JobView, PhaseView, TbtSummary

log = logging.getLogger(__name__)

FinishListener = Callable[["JobRecord", list[float]], None]
"""Called once when a record turns terminal, with the record and its time-between-token gaps
(the record itself keeps only their summary)."""


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    PREFILLING = "PREFILLING"
    TRANSFERRING = "TRANSFERRING"
    DECODING = "DECODING"
    DONE = "DONE"
    FAILED = "FAILED"
    ABORTED = "ABORTED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.ABORTED)


_ORDER = {s: i for i, s in enumerate(JobState)}

PHASE_STATE: dict[str, JobState] = {
    "queue": JobState.PENDING,
    "prefill": JobState.PREFILLING,
    "encode": JobState.PREFILLING,
    "transfer": JobState.TRANSFERRING,
    "decode_queue": JobState.DECODING,
    "decode": JobState.DECODING,
}

FINISH_STATE: dict[str, JobState] = {
    "stop": JobState.DONE,
    "length": JobState.DONE,
    "abort": JobState.ABORTED,
    "error": JobState.FAILED,
}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100) of an already sorted, non-empty list."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_tbt(gaps: list[float]) -> TbtSummary:
    if not gaps:
        return TbtSummary(count=0, mean=None, p50=None, p99=None, max=None)
    s = sorted(gaps)
    return TbtSummary(
        count=len(s), mean=sum(s) / len(s), p50=percentile(s, 50), p99=percentile(s, 99), max=s[-1]
    )


@dataclass
class PhaseSpan:
    name: str
    start: float
    end: float | None = None

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass
class JobRecord:
    """What the router knows about one job; mutated only on the event loop."""

    job_id: str
    endpoint: str
    """"completions" or "chat.completions"."""
    model: str
    arrival: float
    prompt_tokens: int
    codec: str | None = None
    state: JobState = JobState.PENDING
    phases: list[PhaseSpan] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tbt: list[float] = field(default_factory=list)
    """Gaps between consecutive tokens while the job runs; summarized and dropped at the end
    (so a long history of finished jobs stays small)."""
    tbt_summary: TbtSummary | None = None
    completion_tokens: int = 0
    cached_tokens: int | None = None
    """Prompt tokens served from the backend's prefix cache, when it reports them."""
    finished_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    kv_bytes: int | None = None
    """KV bytes sent prefill -> decode, when the backend reports it."""
    kv_bytes_bf16: int | None = None
    """What that KV would have taken as dense bf16, when the backend reports it."""
    kv_bytes_not_sent: int | None = None
    """KV bytes not sent because the decode side held them (its prefix cache), when reported."""
    kv_cached_tokens: int | None = None
    """Prompt tokens whose KV the decode side held already, when the backend reports it."""
    local_prefill: bool = False
    """The decode side computed the prompt's uncached rest itself (nothing was sent)."""
    kv_sent_end: float | None = None
    """When the prefill side handed the last layer to the link, when the backend reports it."""
    listeners: list[FinishListener] = field(default_factory=list, repr=False, compare=False)
    """Set by `JobRegistry.add`: told once when the job ends."""

    @classmethod
    def for_job(cls, job: Job, *, endpoint: str, model: str) -> JobRecord:
        return cls(
            job_id=job.id,
            endpoint=endpoint,
            model=model,
            arrival=job.arrival,
            prompt_tokens=len(job.prompt_ids),
            codec=job.codec,
        )

    # ----------------------------------------------------------------- updates from events

    def _advance(self, state: JobState) -> None:
        if _ORDER[state] > _ORDER[self.state]:
            self.state = state

    def on_phase(self, ev: PhaseEvent) -> None:
        if self.state.terminal:
            return
        if ev.end is not None:
            for span in reversed(self.phases):
                if span.name == ev.name and span.end is None:
                    span.end = ev.end  # closes the span opened by a start-only event
                    break
            else:
                self.phases.append(PhaseSpan(ev.name, ev.start, ev.end))
        elif not any(s.name == ev.name and s.end is None for s in self.phases):
            self.phases.append(PhaseSpan(ev.name, ev.start))
        self._advance(PHASE_STATE[ev.name])

    def on_token(self, ev: TokenEvent, now: float) -> None:
        if self.state.terminal:
            return
        if self.last_token_at is None:
            self.first_token_at = now
        else:
            self.tbt.append(now - self.last_token_at)
        self.last_token_at = now
        self.completion_tokens += 1
        self._advance(JobState.DECODING)

    def on_finish(self, ev: FinishEvent, now: float) -> None:
        if self.state.terminal:
            return
        self.finished_at = now
        for span in self.phases:  # a phase still open when the job ends lasted until its end
            if span.end is None:
                span.end = max(span.start, now)
        self.finish_reason = ev.reason
        self.error = ev.error
        if ev.prompt_tokens is not None:
            self.prompt_tokens = ev.prompt_tokens
        if ev.completion_tokens is not None:
            self.completion_tokens = ev.completion_tokens
        self.cached_tokens = ev.cached_tokens
        if ev.codec is not None:
            self.codec = ev.codec
        self.kv_bytes, self.kv_bytes_bf16 = ev.kv_bytes, ev.kv_bytes_bf16
        self.kv_bytes_not_sent, self.kv_cached_tokens = ev.kv_bytes_not_sent, ev.kv_cached_tokens
        self.local_prefill, self.kv_sent_end = ev.local_prefill, ev.kv_sent_end
        self.state = FINISH_STATE[ev.reason]
        gaps, self.tbt = self.tbt, []
        self.tbt_summary = summarize_tbt(gaps)
        for listener in self.listeners:
            try:
                listener(self, gaps)
            except Exception:  # observability must never break serving
                log.exception("job %s: finish listener failed", self.job_id)

    def abort(self, reason: str, now: float) -> None:
        """The router gave up on the job (client gone, shutdown)."""
        self.on_finish(FinishEvent(reason="abort", error=reason), now)

    # ----------------------------------------------------------------- derived timings

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def jct(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.arrival

    def view(self) -> JobView:
        return JobView(
            id=self.job_id,
            endpoint=self.endpoint,
            model=self.model,
            state=self.state.value,
            arrival=self.arrival,
            finished_at=self.finished_at,
            phases=[
                PhaseView(name=p.name, start=p.start, end=p.end, duration=p.duration)
                for p in self.phases
            ],
            ttft=self.ttft,
            tbt=self.tbt_summary or summarize_tbt(self.tbt),
            jct=self.jct,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            codec=self.codec,
            finish_reason=self.finish_reason,
            error=self.error,
            kv_bytes=self.kv_bytes,
            kv_bytes_bf16=self.kv_bytes_bf16,
            cached_tokens=self.cached_tokens,
            kv_cached_tokens=self.kv_cached_tokens,
            kv_bytes_not_sent=self.kv_bytes_not_sent,
            local_prefill=self.local_prefill,
            kv_sent_end=self.kv_sent_end,
        )


class JobRegistry:
    """The most recent `capacity` job records by id (oldest dropped first)."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.capacity = capacity
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self.total = 0
        """Jobs ever added."""
        self._listeners: list[FinishListener] = []

    def add_listener(self, listener: FinishListener) -> None:
        """Call `listener(record, tbt_gaps)` when each job added from now on ends."""
        self._listeners.append(listener)

    def add(self, record: JobRecord) -> None:
        record.listeners.extend(self._listeners)
        self._records[record.job_id] = record
        self.total += 1
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def get(self, job_id: str) -> JobRecord | None:
        return self._records.get(job_id)

    def recent(self, limit: int) -> list[JobRecord]:
        """Up to `limit` records, newest first."""
        out: list[JobRecord] = []
        for rec in reversed(self._records.values()):
            if len(out) >= limit:
                break
            out.append(rec)
        return out

    def __len__(self) -> int:
        return len(self._records)

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self._records.values():
            counts[rec.state.value] = counts.get(rec.state.value, 0) + 1
        return counts
