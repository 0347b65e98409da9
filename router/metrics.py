"""The router's Prometheus metrics (`GET /metrics`, text format) and what feeds them.

Per app, one `RouterMetrics` over its own `CollectorRegistry` (tests build many apps):

- Job histograms, observed when a job ends (label codec): `zipserve_ttft_seconds` (jobs that got
  a first token), `zipserve_time_between_tokens_seconds` (every gap between two tokens),
  `zipserve_jct_seconds` and `zipserve_phase_seconds{phase}` (jobs that finished normally).
- Counters: `zipserve_requests_total{outcome,reason,codec}` (outcome done | failed | aborted |
  rejected; reason: the finish reason, the failure category of `failure_reason`, or "http_<status>"
  for requests refused before they became a job), prompt / generated tokens, KV bytes sent and
  the bytes dense bf16 would have needed, `zipserve_http_responses_total{route,status}`.
- Prefix caching (jobs whose backend reports it): `zipserve_prompt_cached_tokens_total` (prompt
  tokens whose KV came from the prefill side's prefix cache, not computed),
  `zipserve_prompt_tokens_cache_reported_total` (the prompt tokens of those jobs),
  `zipserve_kv_cached_tokens_total` (prompt tokens the decode side held already, not sent) and
  `zipserve_kv_bytes_not_sent_total` (their wire bytes), `zipserve_local_prefills_total` (jobs
  whose decode worker computed the prompt's short uncached rest itself, nothing sent); the gauge
  `zipserve_prefix_cache_hit_rate`
  is cached / prompt tokens since the router started (rate() of the two counters gives it over a
  window).
- Gauges read at scrape time: jobs in flight at the router by state, whether the backend answers,
  and per worker (labels worker, role, codec) health, free / used pages, queued prompt tokens,
  running sequences, pages its prefix cache maps and its hit rate, from
  `backend.health()["workers"]`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zipserve.router.backend import Backend
from zipserve.router.jobs import JobRecord, JobState
from zipserve.router.serving import JOB_ID_HEADER, RouterState

GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
KNOWN_ROUTES = GENERATION_ROUTES | {
    "/v1/models",
    "/health",
    "/v1/jobs",
    "/metrics",
    "/dashboard",
    "/dashboard/data",
}

DEFAULT_CODEC = "default"
"""The codec label of a job whose backend did not say which codec it used."""

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
TBT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)

_FAILURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        (
            "bad_request",
            r"^(?:codec|prompt|seed|max_tokens|min_tokens|temperature|top_p|top_k"
            r"|stop|stop_token_ids|ignore_eos|logprobs):",
        ),  # refused values
        ("checksum", r"checksum|corrupt"),
        ("deadline", r"deadline|timed out|timeout|incomplete after"),
        ("client_disconnected", r"disconnect"),
        ("shutdown", r"shutting down"),
        ("overloaded", r"overload"),
        ("worker_failed", r"unavailable|worker (?:\w+ )?failed|died|actor"),
    )
)


def failure_reason(error: str | None, default: str = "backend_error") -> str:
    """A short category of a FinishEvent.error message, for the `reason` label."""
    for name, pattern in _FAILURE_PATTERNS:
        if error and pattern.search(error):
            return name
    return default


def job_outcome(rec: JobRecord) -> tuple[str, str]:
    """(outcome, reason) of an ended job: done + finish reason, or failed / aborted + category."""
    if rec.state is JobState.DONE:
        return "done", rec.finish_reason or "stop"
    if rec.state is JobState.FAILED:
        return "failed", failure_reason(rec.error)
    return "aborted", failure_reason(rec.error, default="aborted")


def route_label(path: str) -> str:
    """A bounded route label: known paths as they are, job lookups folded, the rest 'other'."""
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}"
    return "other"


def read_health(backend: Backend) -> dict:
    """backend.health(), or {"status": "error", ...} when it raises."""
    try:
        return dict(backend.health())
    except Exception as exc:
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


@dataclass(frozen=True)
class LiveSnapshot:
    """What the scrape-time gauges show (taken just before rendering)."""

    backend_up: bool
    in_flight: dict[str, int]
    """Router jobs in flight by JobState value."""
    workers: list[dict]
    hit_rates: dict[str, float] = field(default_factory=dict)
    """codec -> prompt tokens served from the prefix cache / prompt tokens (jobs that report it)."""


WORKER_GAUGES = (
    ("zipserve_worker_healthy", "1 when the worker reports healthy, else 0", "healthy"),
    ("zipserve_worker_free_pages", "KV pages free in the worker's pool", "free_pages"),
    ("zipserve_worker_used_pages", "KV pages in use in the worker's pool", "used_pages"),
    ("zipserve_worker_queued_tokens", "Prompt tokens waiting at the worker", "queued_tokens"),
    ("zipserve_worker_running_sequences", "Sequences the worker is running", "running"),
    (
        "zipserve_worker_cached_pages",
        "KV pages the worker's prefix cache maps (held, or free but reusable)",
        "cached_pages",
    ),
    (
        "zipserve_worker_prefix_cache_hit_rate",
        "Prompt tokens served from the worker's prefix cache / tokens looked up (since it started)",
        "cache_hit_rate",
    ),
)


OPTIONAL_WORKER_KEYS = frozenset({"cached_pages", "cache_hit_rate"})
"""Worker keys a backend may leave out (its workers have no prefix cache): no sample then."""


class _LiveCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = LiveSnapshot(backend_up=False, in_flight={}, workers=[])

    def describe(self) -> Iterable[Metric]:
        return list(self._families(LiveSnapshot(False, {}, [])))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self.snapshot))

    @staticmethod
    def _families(snap: LiveSnapshot) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "zipserve_backend_up", "1 when backend.health() answers with status ok"
        )
        up.add_metric([], 1.0 if snap.backend_up else 0.0)
        yield up
        flight = GaugeMetricFamily(
            "zipserve_requests_in_flight",
            "Jobs in flight at the router by state (PENDING: queued)",
            labels=["state"],
        )
        for st in JobState:
            if not st.terminal:
                flight.add_metric([st.value], float(snap.in_flight.get(st.value, 0)))
        yield flight
        rate = GaugeMetricFamily(
            "zipserve_prefix_cache_hit_rate",
            "Prompt tokens whose KV came from the prefix cache / prompt tokens, since the start",
            labels=["codec"],
        )
        for codec, r in sorted(snap.hit_rates.items()):
            rate.add_metric([codec], r)
        yield rate
        for name, doc, key in WORKER_GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=["worker", "role", "codec"])
            for w in snap.workers:
                if w.get(key) is None and key in OPTIONAL_WORKER_KEYS:
                    continue  # not reported (no lookup yet, or a backend without a cache)
                fam.add_metric(
                    [
                        str(w.get("name", "?")),
                        str(w.get("role", "?")),
                        str(w.get("codec", DEFAULT_CODEC)),
                    ],
                    float(w.get(key, 0)),
                )
            yield fam


class RouterMetrics:
    """Every metric of one router app, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.ttft = Histogram(
            "zipserve_ttft_seconds",
            "Arrival to first token at the router",
            ["codec"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tbt = Histogram(
            "zipserve_time_between_tokens_seconds",
            "Gap between consecutive tokens of a job",
            ["codec"],
            buckets=TBT_BUCKETS,
            registry=r,
        )
        self.jct = Histogram(
            "zipserve_jct_seconds",
            "Arrival to finish of jobs that completed",
            ["codec"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.phase = Histogram(
            "zipserve_phase_seconds",
            "Time in each phase of jobs that completed",
            ["phase", "codec"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "zipserve_requests",
            "Requests by outcome and reason",
            ["outcome", "reason", "codec"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "zipserve_prompt_tokens", "Prompt tokens of ended jobs", ["codec"], registry=r
        )
        self.generation_tokens = Counter(
            "zipserve_generation_tokens", "Tokens generated", ["codec"], registry=r
        )
        self.kv_bytes_sent = Counter(
            "zipserve_kv_bytes_sent",
            "KV bytes sent from prefill to decode workers",
            ["codec"],
            registry=r,
        )
        self.kv_bytes_bf16 = Counter(
            "zipserve_kv_bytes_bf16",
            "Bytes the same KV would have taken as dense bf16",
            ["codec"],
            registry=r,
        )
        self.prompt_cached_tokens = Counter(
            "zipserve_prompt_cached_tokens",
            "Prompt tokens whose KV came from the prefill side's prefix cache (not computed)",
            ["codec"],
            registry=r,
        )
        self.prompt_tokens_cache_reported = Counter(
            "zipserve_prompt_tokens_cache_reported",
            "Prompt tokens of the ended jobs whose backend reported prefix-cache hits",
            ["codec"],
            registry=r,
        )
        self.kv_cached_tokens = Counter(
            "zipserve_kv_cached_tokens",
            "Prompt tokens whose KV the decode side held already (not sent)",
            ["codec"],
            registry=r,
        )
        self.kv_bytes_not_sent = Counter(
            "zipserve_kv_bytes_not_sent",
            "KV bytes not sent because the decode side held those pages (its prefix cache)",
            ["codec"],
            registry=r,
        )
        self.local_prefills = Counter(
            "zipserve_local_prefills",
            "Jobs whose decode worker computed the prompt's uncached rest itself (nothing sent)",
            ["codec"],
            registry=r,
        )
        self._cache_totals: dict[str, list[int]] = {}
        """codec -> [cached prompt tokens, prompt tokens] of jobs reporting cached tokens."""
        self.http = Counter(
            "zipserve_http_responses",
            "HTTP responses by route and status",
            ["route", "status"],
            registry=r,
        )
        self._live = _LiveCollector()
        r.register(self._live)
        self._render_lock = threading.Lock()

    # ----------------------------------------------------------------- feeding

    def observe_job(self, rec: JobRecord, gaps: list[float]) -> None:
        """A JobRegistry finish listener: one ended job."""
        codec = rec.codec or DEFAULT_CODEC
        outcome, reason = job_outcome(rec)
        self.requests.labels(outcome, reason, codec).inc()
        self.prompt_tokens.labels(codec).inc(rec.prompt_tokens)
        self.generation_tokens.labels(codec).inc(rec.completion_tokens)
        if rec.kv_bytes is not None and rec.kv_bytes_bf16 is not None:
            self.kv_bytes_sent.labels(codec).inc(rec.kv_bytes)
            self.kv_bytes_bf16.labels(codec).inc(rec.kv_bytes_bf16)
        if rec.cached_tokens is not None:
            self.prompt_cached_tokens.labels(codec).inc(rec.cached_tokens)
            self.prompt_tokens_cache_reported.labels(codec).inc(rec.prompt_tokens)
            tot = self._cache_totals.setdefault(codec, [0, 0])
            tot[0] += rec.cached_tokens
            tot[1] += rec.prompt_tokens
        if rec.kv_cached_tokens is not None:
            self.kv_cached_tokens.labels(codec).inc(rec.kv_cached_tokens)
        if rec.kv_bytes_not_sent is not None:
            self.kv_bytes_not_sent.labels(codec).inc(rec.kv_bytes_not_sent)
        if rec.local_prefill:
            self.local_prefills.labels(codec).inc()
        if rec.ttft is not None:
            self.ttft.labels(codec).observe(rec.ttft)
        tbt = self.tbt.labels(codec)
        for gap in gaps:
            tbt.observe(gap)
        if rec.state is JobState.DONE and rec.jct is not None:
            self.jct.labels(codec).observe(rec.jct)
            for span in rec.phases:
                if span.duration is not None:
                    self.phase.labels(span.name, codec).observe(span.duration)

    def observe_response(self, path: str, status: int, became_job: bool) -> None:
        """One HTTP response; a generation request refused before it became a job counts as
        rejected."""
        route = route_label(path)
        self.http.labels(route, str(status)).inc()
        if route in GENERATION_ROUTES and status >= 400 and not became_job:
            self.requests.labels("rejected", f"http_{status}", DEFAULT_CODEC).inc()

    def set_live(self, health: dict, active: Iterable[JobRecord]) -> None:
        in_flight: dict[str, int] = {}
        for rec in active:
            in_flight[rec.state.value] = in_flight.get(rec.state.value, 0) + 1
        workers = health.get("workers")
        self._live.snapshot = LiveSnapshot(
            backend_up=health.get("status", "ok") == "ok",
            in_flight=in_flight,
            workers=[w for w in workers if isinstance(w, dict)]
            if isinstance(workers, list)
            else [],
            hit_rates=self.hit_rates(),
        )

    def hit_rates(self) -> dict[str, float]:
        """codec -> cached / prompt tokens of the ended jobs that reported cached tokens."""
        return {c: hit / total for c, (hit, total) in self._cache_totals.items() if total}

    def render(self) -> bytes:
        with self._render_lock:
            return generate_latest(self.registry)

    def metric_names(self) -> set[str]:
        """Every sample name this registry exports (histogram _bucket/_sum/_count, counter
        _total and _created included)."""
        names: set[str] = set()
        for family in self.registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + sfx for sfx in ("_bucket", "_sum", "_count"))
        return names


class MetricsMiddleware:
    """Counts every HTTP response by route and status (pure ASGI, outermost)."""

    def __init__(self, app: ASGIApp, *, metrics: RouterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen: dict[str, object] = {}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and "status" not in seen:
                seen["status"] = message["status"]
                seen["job"] = any(
                    k.lower() == JOB_ID_HEADER.encode() for k, _ in message.get("headers", [])
                )
                self.metrics.observe_response(scope["path"], message["status"], bool(seen["job"]))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if "status" not in seen:  # the error handler outside us will answer 500
                self.metrics.observe_response(scope["path"], 500, False)
            raise


def install_metrics(app: FastAPI, state: RouterState) -> RouterMetrics:
    """Add `GET /metrics`, the response-counting middleware and the job listener to `app`.
    Call after any other middleware, so that responses they refuse (401, ...) count too."""
    metrics = RouterMetrics()
    state.registry.add_listener(metrics.observe_job)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        health = await anyio.to_thread.run_sync(read_health, state.backend)
        metrics.set_live(health, [run.record for run in list(state.active.values())])
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return metrics


__all__ = [
    "MetricsMiddleware",
    "RouterMetrics",
    "failure_reason",
    "install_metrics",
    "read_health",
]
