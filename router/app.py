"""The router's FastAPI app: OpenAI-compatible completions and chat, models, health, job records.

    app = create_app(backend, api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE with "stream": true),
GET /v1/models, GET /health (open even with an API key, but then only the status and counts:
the details need the key), GET /v1/jobs/{id}, GET /v1/jobs?limit=N,
GET /metrics (Prometheus, router/metrics.py), GET /dashboard (+ /dashboard/data, router/dashboard.py;
the page itself is open, its data needs the key).
Every generation response carries the job id: in the OpenAI `id` ("cmpl-<id>" for completions,
"chatcmpl-<id>" for chat) and in the `x-zipserve-job-id` header. Errors are OpenAI error bodies.
Request bodies are parsed as JSON whatever their Content-Type (curl -d sends a form type), and
must arrive within the body timeout (router/read_timeouts.py; the header timeout is uvicorn's
side: `read_timeouts.uvicorn_options`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from zipserve.router.admission import admit_chat, admit_completion
from zipserve.router.auth import OPEN_PATHS, ApiKeyMiddleware, has_key
from zipserve.router.backend import Backend, Job
from zipserve.router.dashboard import OPEN_PATHS as DASHBOARD_OPEN_PATHS
from zipserve.router.dashboard import install_dashboard
from zipserve.router.errors import OpenAIError, install_error_handlers, parse_model
from zipserve.router.formats import ChatFormat, CompletionFormat
from zipserve.router.jobs import JobRegistry
from zipserve.router.json_body import parse_json_body
from zipserve.router.limits import AdmissionConfig, BodySizeLimit
from zipserve.router.metrics import install_metrics
from zipserve.router.read_timeouts import BodyReadTimeout
from zipserve.router.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    JobList,
    JobView,
    ModelCard,
    ModelList,
)
from zipserve.router.serving import RouterState, respond
from zipserve.router.timing import ArrivalStampMiddleware, arrival_of

DEFAULT_JOB_HISTORY = 1000
"""Job records kept for /v1/jobs (oldest dropped first)."""


async def read_json(request: Request) -> Any:
    return parse_json_body(await request.body())


def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def create_app(
    backend: Backend,
    *,
    api_key: str | None = None,
    job_history: int = DEFAULT_JOB_HISTORY,
    limits: AdmissionConfig | None = None,
) -> FastAPI:
    """An app serving `backend`; with `api_key`, every route but /health needs that bearer key;
    `limits`: queue, prompt, timeout and body-size limits (defaults: `AdmissionConfig()`).
    No CORS middleware: browsers on other origins get no Access-Control-* headers."""
    limits = limits or AdmissionConfig()
    state = RouterState(backend=backend, registry=JobRegistry(job_history), limits=limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await state.shutdown()

    def _strings_for(job: Job):
        return None if job.logprobs is None else backend.token_strings

    app = FastAPI(title="zipserve router", lifespan=lifespan)
    app.state.router = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(BodyReadTimeout, timeout_s=limits.body_timeout_s)
    if api_key is not None:  # added after the size limit = runs before it: no body read unkeyed
        app.add_middleware(
            ApiKeyMiddleware, api_key=api_key, open_paths=OPEN_PATHS | DASHBOARD_OPEN_PATHS
        )
    metrics = install_metrics(app, state)  # counts 401/413s too
    install_dashboard(app, state, metrics)
    app.add_middleware(ArrivalStampMiddleware)  # added last: outermost, runs first

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        arrival = arrival_of(request)
        req = parse_model(CompletionRequest, await read_json(request))
        job = admit_completion(backend, req, arrival, limits)
        fmt = CompletionFormat(
            id=f"cmpl-{job.id}",
            created=int(arrival),
            model=backend.model_name,
            token_strings=_strings_for(job),
            token_ids=not backend.has_tokenizer,
        )
        return await respond(
            state, request, job, fmt, stream=req.stream, include_usage=_include_usage(req)
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        arrival = arrival_of(request)
        req = parse_model(ChatCompletionRequest, await read_json(request))
        job = admit_chat(backend, req, arrival, limits)
        fmt = ChatFormat(
            id=f"chatcmpl-{job.id}",
            created=int(arrival),
            model=backend.model_name,
            token_strings=_strings_for(job),
        )
        return await respond(
            state, request, job, fmt, stream=req.stream, include_usage=_include_usage(req)
        )

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=backend.model_name,
                    created=int(state.started),
                    max_model_len=backend.max_model_len,
                )
            ]
        )

    @app.get("/health", response_model=None)
    async def health(request: Request) -> JSONResponse:
        """Without the key (when one is set): the status and counts only; the model, the
        workers and their errors need the key."""
        try:
            backend_health = dict(backend.health())
            ok = backend_health.get("status", "ok") == "ok"
        except Exception as exc:
            backend_health = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            ok = False
        status = 200 if ok else 503
        workers = backend_health.get("workers") or []
        if not has_key(request.headers.raw, api_key):
            return JSONResponse(
                {
                    "status": "ok" if ok else "unavailable",
                    "workers": {
                        "total": len(workers),
                        "healthy": sum(1 for w in workers if w.get("healthy")),
                    },
                    "jobs": {"active": len(state.active), "queued": state.gate.queued_jobs},
                },
                status_code=status,
            )
        body = {
            "status": "ok" if ok else "unavailable",
            "model": backend.model_name,
            "backend": backend_health,
            "router": {
                "uptime_s": time.time() - state.started,
                "active_jobs": len(state.active),
                "jobs_total": state.registry.total,
                "jobs_by_state": state.registry.count_by_state(),
                "admission": state.gate.stats(),
            },
        }
        return JSONResponse(body, status_code=status)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> JobView:
        """One job by its id (the OpenAI response id, "cmpl-<id>", works too)."""
        record = state.registry.get(job_id.removeprefix("chatcmpl-").removeprefix("cmpl-"))
        if record is None:
            raise OpenAIError(
                404,
                f"job_id: no job '{job_id}' (unknown, or older than the "
                f"last {state.registry.capacity} jobs)",
                param="job_id",
                code="job_not_found",
            )
        return record.view()

    @app.get("/v1/jobs")
    async def list_jobs(limit: int = Query(50, ge=1, le=10_000)) -> JobList:
        return JobList(data=[r.view() for r in state.registry.recent(limit)])

    return app
