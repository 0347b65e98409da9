"""Admission against `FakeBackend`: a full queue answers 429 in OpenAI format with Retry-After
(never an unbounded wait) and empties again; prompt-length limit; per-request timeout (config
and request field) ends the job with a clear error and aborts it in the backend; config
validation."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fake_backend import FakeBackend

from zipserve.router.app import create_app
from zipserve.router.limits import AdmissionConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=20
    )


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


async def test_full_queue_answers_429_with_retry_after_then_recovers():
    backend = FakeBackend(phase_delay=0.15, token_delay=0.001)  # ~0.3 s queued per job
    app = create_app(backend, limits=AdmissionConfig(max_queued_jobs=3, retry_after_s=2))
    async with client_for(app) as c:
        body = {"prompt": "hello", "max_tokens": 3}
        rs = await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(8)])
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) == 3 and codes.count(429) == 5, codes
        for r in rs:
            if r.status_code == 429:
                err = error_of(r, 429)
                assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
                assert r.headers["retry-after"] == "2"
        health = (await c.get("/health")).json()["router"]["admission"]
        assert health["queued_jobs"] == 0 and health["queued_tokens"] == 0
        assert health["rejected_429"] == 5
        r = await c.post("/v1/completions", json=body)  # room again
        assert r.status_code == 200
    assert not backend.active


async def test_queued_token_limit_counts_prompt_tokens_until_prefill_ends():
    backend = FakeBackend(phase_delay=0.2)
    # the fake tokenizer is bytes: a 30-character prompt is 30 tokens
    app = create_app(backend, limits=AdmissionConfig(max_queued_tokens=50))
    async with client_for(app) as c:
        body = {"prompt": "x" * 30, "max_tokens": 2}
        first = asyncio.create_task(c.post("/v1/completions", json=body))
        await asyncio.sleep(0.05)  # the first job is queued (30 of 50 tokens)
        r = await c.post("/v1/completions", json=body)
        err = error_of(r, 429)
        assert "prompt tokens" in err["message"] and "30" in err["message"]
        small = await c.post("/v1/completions", json={"prompt": "y" * 10, "max_tokens": 2})
        assert small.status_code == 200  # 30 + 10 fits
        assert (await first).status_code == 200


async def test_streaming_request_gets_429_before_any_event():
    backend = FakeBackend(phase_delay=0.3)
    app = create_app(backend, limits=AdmissionConfig(max_queued_jobs=1))
    async with client_for(app) as c:
        body = {"prompt": "hi", "max_tokens": 2, "stream": True}
        first = asyncio.create_task(c.post("/v1/completions", json=body))
        await asyncio.sleep(0.05)
        r = await c.post("/v1/completions", json=body)
        assert r.headers["content-type"].startswith("application/json")
        error_of(r, 429)
        assert "retry-after" in r.headers
        assert (await first).status_code == 200


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "x" * 21}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40}]}, "messages"),
    ],
)
async def test_prompt_length_limit_names_the_field(path, body, param):
    app = create_app(FakeBackend(), limits=AdmissionConfig(max_prompt_tokens=20))
    async with client_for(app) as c:
        err = error_of(await c.post(path, json=body), 400)
        assert err["param"] == param and param in err["message"]
        assert err["code"] == "prompt_too_long" and "20" in err["message"]
        ok = await c.post("/v1/completions", json={"prompt": "x" * 20, "max_tokens": 1})
        assert ok.status_code == 200


async def test_request_timeout_ends_job_and_aborts_it():
    backend = FakeBackend(token_delay=0.05)
    app = create_app(backend, limits=AdmissionConfig(request_timeout_s=0.4))
    async with client_for(app) as c:
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100})
        err = error_of(r, 504)
        assert err["code"] == "request_timeout" and "0.4 s" in err["message"]
        job_id = r.headers["x-zipserve-job-id"]
        assert job_id in backend.aborted
        job = (await c.get(f"/v1/jobs/{job_id}")).json()
        assert job["state"] == "FAILED" and job["error"].startswith("timeout:")
        assert 0.35 < job["jct"] < 2.0
    assert not backend.active  # the backend stream was closed


async def test_request_timeout_field_streaming():
    backend = FakeBackend(token_delay=0.05)
    app = create_app(backend, limits=AdmissionConfig(request_timeout_s=30))
    async with client_for(app) as c:
        r = await c.post(
            "/v1/completions",
            json={"prompt": "hi", "max_tokens": 100, "stream": True, "timeout": 0.3},
        )
        assert r.status_code == 200
        frames = [f.removeprefix("data: ") for f in r.text.split("\n\n") if f]
        assert frames[-1] == "[DONE]"
        err = json.loads(frames[-2])["error"]
        assert err["code"] == "request_timeout"
        assert 1 <= len(frames) - 2 < 100  # some tokens came, then the timeout
        too_long = await c.post("/v1/completions", json={"prompt": "hi", "timeout": 31})
        assert error_of(too_long, 400)["param"] == "timeout"
        bad = await c.post("/v1/completions", json={"prompt": "hi", "timeout": -1})
        assert error_of(bad, 400)["param"] == "timeout"
    assert not backend.active


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_queued_tokens": 0}, "max_queued_tokens"),
        ({"max_queued_jobs": 0}, "max_queued_jobs"),
        ({"max_prompt_tokens": 100, "max_queued_tokens": 50}, "max_prompt_tokens"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"retry_after_s": 0}, "retry_after_s"),
    ],
)
def test_config_is_validated_where_built(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdmissionConfig(**kwargs)
