"""What `/dashboard/data` answers: recent jobs with their phases, latency percentiles over time,
throughput, KV bytes and prefix-cache hits per codec, the workers' page pools (with their prefix
caches) and recent failures.

`DashboardHistory` is a JobRegistry finish listener that keeps a bounded sample of ended jobs
(time-between-token gaps thinned to at most `MAX_GAPS_PER_JOB` per job); `dashboard_data` joins
it with the registry (recent jobs, in flight included), the metrics (rejections, which never
become jobs) and `backend.health()` (workers).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from zipserve.router.jobs import JobRecord, percentile
from zipserve.router.metrics import DEFAULT_CODEC, RouterMetrics, job_outcome
from zipserve.router.serving import RouterState

MAX_GAPS_PER_JOB = 64
"""Time-between-token gaps kept per job (evenly thinned beyond that)."""

RECENT_JOBS = 24
"""Jobs drawn as JCT bars."""

RECENT_FAILURES = 20

WINDOW_S = 900.0
"""How far back the percentile and throughput series reach."""

BUCKETS_S = (1, 2, 5, 10, 15, 30, 60)
MAX_POINTS = 40


@dataclass(frozen=True)
class JobSample:
    """One ended job, as the time series need it."""

    job_id: str
    finished_at: float
    codec: str
    outcome: str
    """done | failed | aborted"""
    reason: str
    ttft: float | None
    jct: float | None
    """Only for jobs that completed (outcome done)."""
    gaps: tuple[float, ...]
    prompt_tokens: int
    completion_tokens: int
    kv_bytes: int | None
    kv_bytes_bf16: int | None
    error: str | None
    cached_tokens: int | None = None
    kv_cached_tokens: int | None = None
    kv_bytes_not_sent: int | None = None


def thin(values: list[float], keep: int) -> tuple[float, ...]:
    """At most `keep` values, evenly spaced through `values`."""
    if len(values) <= keep:
        return tuple(values)
    step = len(values) / keep
    return tuple(values[int(i * step)] for i in range(keep))


@dataclass
class CodecTotals:
    jobs: int = 0
    """Jobs that reported their KV bytes."""
    kv_bytes: int = 0
    kv_bytes_bf16: int = 0
    cache_jobs: int = 0
    """Jobs that reported prefix-cache hits (cached_tokens)."""
    cache_prompt_tokens: int = 0
    """Their prompt tokens."""
    cached_tokens: int = 0
    """Their prompt tokens whose KV came from the prefill side's prefix cache."""
    kv_cached_tokens: int = 0
    """Prompt tokens whose KV the decode side held (not sent)."""
    kv_bytes_not_sent: int = 0


class DashboardHistory:
    """The last `capacity` ended jobs, per-codec KV byte totals and the recent failures."""

    def __init__(self, capacity: int = 4000) -> None:
        self.samples: deque[JobSample] = deque(maxlen=capacity)
        self.failures: deque[JobSample] = deque(maxlen=RECENT_FAILURES)
        self.codecs: dict[str, CodecTotals] = {}

    def observe_job(self, rec: JobRecord, gaps: list[float]) -> None:
        outcome, reason = job_outcome(rec)
        sample = JobSample(
            job_id=rec.job_id,
            finished_at=rec.finished_at or time.time(),
            codec=rec.codec or DEFAULT_CODEC,
            outcome=outcome,
            reason=reason,
            ttft=rec.ttft,
            jct=rec.jct if outcome == "done" else None,
            gaps=thin(gaps, MAX_GAPS_PER_JOB),
            prompt_tokens=rec.prompt_tokens,
            completion_tokens=rec.completion_tokens,
            kv_bytes=rec.kv_bytes,
            kv_bytes_bf16=rec.kv_bytes_bf16,
            error=rec.error,
            cached_tokens=rec.cached_tokens,
            kv_cached_tokens=rec.kv_cached_tokens,
            kv_bytes_not_sent=rec.kv_bytes_not_sent,
        )
        self.samples.append(sample)
        if outcome != "done":
            self.failures.append(sample)
        if rec.kv_bytes is not None and rec.kv_bytes_bf16 is not None:
            tot = self.codecs.setdefault(sample.codec, CodecTotals())
            tot.jobs += 1
            tot.kv_bytes += rec.kv_bytes
            tot.kv_bytes_bf16 += rec.kv_bytes_bf16
        if rec.cached_tokens is not None:
            tot = self.codecs.setdefault(sample.codec, CodecTotals())
            tot.cache_jobs += 1
            tot.cache_prompt_tokens += rec.prompt_tokens
            tot.cached_tokens += rec.cached_tokens
            tot.kv_cached_tokens += rec.kv_cached_tokens or 0
            tot.kv_bytes_not_sent += rec.kv_bytes_not_sent or 0


def quantiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None}
    s = sorted(values)
    return {
        "count": len(s),
        "p50": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
    }


def bucket_width(span: float) -> int:
    """The smallest of BUCKETS_S that cuts `span` seconds into at most MAX_POINTS buckets."""
    for b in BUCKETS_S:
        if span / b <= MAX_POINTS:
            return b
    return BUCKETS_S[-1]


def series(samples: list[JobSample], now: float) -> dict:
    """Per time bucket (by finish time): p50/p99 of TTFT, time between tokens and JCT, tokens/s
    and requests/s; buckets with no job hold None."""
    first = min((s.finished_at for s in samples), default=now)
    width = bucket_width(max(now - first, 1.0))
    n = int((now - first) // width) + 1
    start = now - n * width
    buckets: list[list[JobSample]] = [[] for _ in range(n)]
    for s in samples:
        buckets[min(n - 1, max(0, int((s.finished_at - start) // width)))].append(s)
    out: dict[str, list] = {
        k: []
        for k in (
            "t",
            "ttft_p50",
            "ttft_p99",
            "tbt_p50",
            "tbt_p99",
            "jct_p50",
            "jct_p99",
            "tokens_per_s",
            "requests_per_s",
        )
    }
    for i, group in enumerate(buckets):
        out["t"].append(start + (i + 1) * width)
        for key, values in (
            ("ttft", [s.ttft for s in group if s.ttft is not None]),
            ("tbt", [g for s in group for g in s.gaps]),
            ("jct", [s.jct for s in group if s.jct is not None]),
        ):
            q = quantiles(values)
            out[f"{key}_p50"].append(q["p50"])
            out[f"{key}_p99"].append(q["p99"])
        out["tokens_per_s"].append(sum(s.completion_tokens for s in group) / width)
        out["requests_per_s"].append(len(group) / width)
    return {"bucket_s": width, **out}


def job_row(rec: JobRecord, now: float) -> dict:
    """One JCT bar: phase offsets from arrival and durations (open phases run to `now`)."""
    end = rec.finished_at if rec.finished_at is not None else now
    phases = [
        {
            "name": p.name,
            "offset": p.start - rec.arrival,
            "duration": (p.end if p.end is not None else end) - p.start,
        }
        for p in rec.phases
    ]
    codec = rec.codec or (DEFAULT_CODEC if rec.state.terminal else None)  # None: not known yet
    return {
        "id": rec.job_id,
        "state": rec.state.value,
        "codec": codec,
        "arrival": rec.arrival,
        "elapsed": end - rec.arrival,
        "jct": rec.jct,
        "ttft": rec.ttft,
        "phases": phases,
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "cached_tokens": rec.cached_tokens,
        "kv_cached_tokens": rec.kv_cached_tokens,
        "kv_bytes": rec.kv_bytes,
        "kv_bytes_not_sent": rec.kv_bytes_not_sent,
        "local_prefill": rec.local_prefill,
        "error": rec.error,
    }


def outcome_counts(metrics: RouterMetrics) -> list[dict]:
    out = []
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total") and s.value:
                out.append(
                    {
                        "outcome": s.labels["outcome"],
                        "reason": s.labels["reason"],
                        "codec": s.labels["codec"],
                        "count": int(s.value),
                    }
                )
    return out


def dashboard_data(
    state: RouterState,
    history: DashboardHistory,
    metrics: RouterMetrics,
    health: dict,
    now: float | None = None,
) -> dict:
    now = time.time() if now is None else now
    samples = [s for s in history.samples if s.finished_at >= now - WINDOW_S]
    workers = health.get("workers")
    codecs = []
    for name, tot in sorted(history.codecs.items()):
        codecs.append(
            {
                "codec": name,
                "jobs": tot.jobs,
                "kv_bytes": tot.kv_bytes,
                "kv_bytes_bf16": tot.kv_bytes_bf16,
                "saved_bytes": tot.kv_bytes_bf16 - tot.kv_bytes,
                "ratio": tot.kv_bytes_bf16 / tot.kv_bytes if tot.kv_bytes else None,
                "cache_jobs": tot.cache_jobs,
                "prompt_tokens": tot.cache_prompt_tokens,
                "cached_tokens": tot.cached_tokens,
                "hit_rate": (
                    tot.cached_tokens / tot.cache_prompt_tokens if tot.cache_prompt_tokens else None
                ),
                "kv_cached_tokens": tot.kv_cached_tokens,
                "kv_bytes_not_sent": tot.kv_bytes_not_sent,
            }
        )
    return {
        "now": now,
        "model": state.backend.model_name,
        "uptime_s": now - state.started,
        "status": health.get("status", "ok"),
        "backend_error": health.get("error"),
        "jobs_total": state.registry.total,
        "in_flight": len(state.active),
        "outcomes": outcome_counts(metrics),
        "jobs": [job_row(r, now) for r in state.registry.recent(RECENT_JOBS)],
        "summary": {
            "window_s": WINDOW_S,
            "ttft": quantiles([s.ttft for s in samples if s.ttft is not None]),
            "tbt": quantiles([g for s in samples for g in s.gaps]),
            "jct": quantiles([s.jct for s in samples if s.jct is not None]),
        },
        "series": series(samples, now),
        "codecs": codecs,
        "workers": [w for w in workers if isinstance(w, dict)] if isinstance(workers, list) else [],
        "failures": [
            {
                "job_id": s.job_id,
                "time": s.finished_at,
                "outcome": s.outcome,
                "reason": s.reason,
                "codec": s.codec,
                "error": s.error,
            }
            for s in reversed(history.failures)
        ],
    }
