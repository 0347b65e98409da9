"""GET /metrics against `FakeBackend`: histogram counts match the requests served, token and KV
byte counters match what was served, failures and rejections are counted by reason, worker
gauges follow the page pool (and return to empty), each app has its own registry, API key."""

from __future__ import annotations

import anyio
import httpx
import pytest
from fake_backend import FakeBackend, fake_kv_bytes
from prometheus_client.parser import text_string_to_metric_families

from zipserve.router.app import create_app
from zipserve.router.backend import PHASES
from zipserve.router.metrics import failure_reason, route_label

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def backend():
    b = FakeBackend(max_model_len=256)
    yield b
    assert not b.active, f"backend streams still running: {b.active}"


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    )


async def scrape(c: httpx.AsyncClient, **headers) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of one /metrics scrape."""
    r = await c.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    want = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def test_histograms_and_counters_match_served_requests(backend):
    app = create_app(backend)
    served = []  # (codec, prompt_tokens, completion_tokens)
    async with client_for(app) as c:
        for i, codec in enumerate(["bf16", "hack4", "hack4", None]):
            body = {"prompt": "def f(x):" * (i + 1), "max_tokens": 3 + 2 * i}
            if codec:
                body["codec"] = codec
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            u = r.json()["usage"]
            served.append((codec or "bf16", u["prompt_tokens"], u["completion_tokens"]))
        r = await c.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
                "codec": "fp8",
            },
        )
        assert r.status_code == 200
        usage = [
            line for line in r.text.split("\n\n") if '"usage": {' in line or '"usage":{' in line
        ][-1]
        assert '"completion_tokens":4' in usage.replace(" ", "")
        served.append(("fp8", len(backend.jobs[-1].prompt_ids), 4))
        m = await scrape(c)

    for codec in {s[0] for s in served}:
        mine = [s for s in served if s[0] == codec]
        n = len(mine)
        assert value(m, "zipserve_ttft_seconds_count", codec=codec) == n
        assert value(m, "zipserve_jct_seconds_count", codec=codec) == n
        for phase in PHASES:
            assert value(m, "zipserve_phase_seconds_count", codec=codec, phase=phase) == n
        assert value(m, "zipserve_time_between_tokens_seconds_count", codec=codec) == sum(
            s[2] - 1 for s in mine
        )
        assert value(m, "zipserve_prompt_tokens_total", codec=codec) == sum(s[1] for s in mine)
        assert value(m, "zipserve_generation_tokens_total", codec=codec) == sum(s[2] for s in mine)
        sent = sum(fake_kv_bytes(s[1], codec)[0] for s in mine)
        dense = sum(fake_kv_bytes(s[1], codec)[1] for s in mine)
        assert value(m, "zipserve_kv_bytes_sent_total", codec=codec) == sent
        assert value(m, "zipserve_kv_bytes_bf16_total", codec=codec) == dense
        assert value(m, "zipserve_requests_total", codec=codec, outcome="done") == n
    assert value(m, "zipserve_kv_bytes_sent_total", codec="hack4") < value(
        m, "zipserve_kv_bytes_bf16_total", codec="hack4"
    )
    # every +Inf bucket holds every observation, and the sums are plausible durations
    assert value(m, "zipserve_jct_seconds_bucket", le="+Inf") == len(served)
    assert 0 < value(m, "zipserve_ttft_seconds_sum") < value(m, "zipserve_jct_seconds_sum")
    assert value(m, "zipserve_http_responses_total", route="/v1/completions", status="200") == 4
    assert (
        value(m, "zipserve_http_responses_total", route="/v1/chat/completions", status="200") == 1
    )


async def test_failures_and_rejections_by_reason(backend):
    app = create_app(backend)
    async with client_for(app) as c:
        backend.fail_message = "KV rejected: checksum mismatch: the pages were corrupted"
        backend.fail_after_tokens = 0
        r = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
        assert r.status_code == 500
        backend.fail_message = "KV transfer missed its deadline"
        r = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True})
        assert r.status_code == 200 and "deadline" in r.text
        backend.fail_message = None
        assert (
            await c.post("/v1/completions", json={"prompt": "", "max_tokens": 3})
        ).status_code == 400
        assert (
            await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 0})
        ).status_code == 400
        assert (await c.get("/v1/jobs/nope")).status_code == 404
        m = await scrape(c)
    assert value(m, "zipserve_requests_total", outcome="failed", reason="checksum") == 1
    assert value(m, "zipserve_requests_total", outcome="failed", reason="deadline") == 1
    assert value(m, "zipserve_requests_total", outcome="rejected", reason="http_400") == 2
    assert value(m, "zipserve_requests_total", outcome="done") == 0
    # failed jobs have no JCT / phase observations
    assert value(m, "zipserve_jct_seconds_count") == 0
    assert value(m, "zipserve_phase_seconds_count") == 0
    assert value(m, "zipserve_http_responses_total", route="/v1/completions", status="500") == 1
    assert value(m, "zipserve_http_responses_total", route="/v1/jobs/{id}", status="404") == 1


async def test_worker_gauges_follow_the_page_pool(backend):
    backend.token_delay = 0.02
    app = create_app(backend)
    async with client_for(app) as c:
        m = await scrape(c)
        assert value(m, "zipserve_backend_up") == 1
        decode = {"worker": "fake-decode-0", "role": "decode", "codec": "bf16"}
        assert value(m, "zipserve_worker_free_pages", **decode) == backend.num_pages
        assert value(m, "zipserve_worker_used_pages", **decode) == 0
        assert value(m, "zipserve_worker_healthy", worker="fake-prefill-0") == 1

        prompt = "x" * 40  # 40 tokens: 3 pages of 16 from the start of decoding

        async def slow_request() -> None:
            r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20})
            assert r.status_code == 200

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_request)
            with anyio.fail_after(5):
                while True:
                    m = await scrape(c)
                    if value(m, "zipserve_worker_running_sequences", **decode) == 1:
                        break
                    await anyio.sleep(0.01)
            used = value(m, "zipserve_worker_used_pages", **decode)
            assert used >= 3
            assert value(m, "zipserve_worker_free_pages", **decode) == backend.num_pages - used
            assert value(m, "zipserve_requests_in_flight", state="DECODING") == 1
        backend.unhealthy.add("fake-decode-0")
        m = await scrape(c)
    # every page back in the pool, nothing in flight
    assert value(m, "zipserve_worker_used_pages", **decode) == 0
    assert value(m, "zipserve_worker_free_pages", **decode) == backend.num_pages
    assert value(m, "zipserve_worker_running_sequences", **decode) == 0
    assert value(m, "zipserve_requests_in_flight") == 0
    assert value(m, "zipserve_worker_healthy", **decode) == 0


async def test_backend_health_failure_is_a_gauge_not_an_error(backend):
    def broken() -> dict:
        raise RuntimeError("ray is down")

    backend.health = broken
    async with client_for(create_app(backend)) as c:
        m = await scrape(c)
    assert value(m, "zipserve_backend_up") == 0
    assert not [k for k in m if k[0].startswith("zipserve_worker_")]


async def test_each_app_has_its_own_registry(backend):
    a, b = create_app(backend), create_app(backend)
    async with client_for(a) as ca, client_for(b) as cb:
        assert (
            await ca.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        ).status_code == 200
        ma, mb = await scrape(ca), await scrape(cb)
    assert value(ma, "zipserve_jct_seconds_count") == 1
    assert value(mb, "zipserve_jct_seconds_count") == 0


async def test_api_key_guards_metrics_and_counts_refusals(backend):
    app = create_app(backend, api_key="sekret")
    async with client_for(app) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/dashboard/data")).status_code == 401
        assert (await c.get("/dashboard")).status_code == 200  # the page holds no data
        assert (await c.get("/health")).status_code == 200
        assert (await c.post("/v1/completions", json={"prompt": "a"})).status_code == 401
        m = await scrape(c, authorization="Bearer sekret")
        assert (
            await c.get("/dashboard/data", headers={"authorization": "Bearer sekret"})
        ).status_code == 200
    assert value(m, "zipserve_requests_total", outcome="rejected", reason="http_401") == 1
    assert value(m, "zipserve_http_responses_total", route="/metrics", status="401") == 1


def test_failure_reason_categories():
    assert failure_reason("KV rejected: checksum mismatch: the pages were corrupted") == "checksum"
    assert failure_reason("KV transfer missed its deadline") == "deadline"
    assert failure_reason("KV transfer incomplete after 30.0 s (3/6 layers)") == "deadline"
    assert failure_reason("overloaded: no free pages") == "overloaded"
    assert failure_reason("unavailable: decode worker 0 failed: ActorDiedError") == "worker_failed"
    assert failure_reason("unavailable: prefill worker 1 failed: RayActorError") == "worker_failed"
    assert failure_reason("client disconnected", default="aborted") == "client_disconnected"
    assert failure_reason("router shutting down", default="aborted") == "shutdown"
    assert failure_reason("codec: this deployment serves 'bf16', not 'fp8'") == "bad_request"
    assert failure_reason("decode step failed: RuntimeError: boom") == "backend_error"
    assert failure_reason(None) == "backend_error"
    assert route_label("/v1/jobs/abc") == "/v1/jobs/{id}"
    assert route_label("/../../etc/passwd") == "other"
