"""Prefix caching as the router shows it (issue 20.2), against `FakeBackend`: per job in
/v1/jobs (cached tokens on the prefill side, tokens the decode side held, KV bytes not sent), in
/metrics (counters, the hit-rate gauge per codec, per-worker cache gauges) and in
/dashboard/data (per codec and per job); jobs whose backend reports nothing change none of it."""

from __future__ import annotations

import httpx
import pytest
from fake_backend import FakeBackend, fake_kv_bytes
from prometheus_client.parser import text_string_to_metric_families

from zipserve.router.app import create_app
from zipserve.router.metrics import RouterMetrics

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    )


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def test_cache_hits_per_job_in_metrics_and_dashboard():
    backend = FakeBackend(max_model_len=256)
    backend.cached_tokens, backend.held_tokens = 8, 16
    app = create_app(backend)
    prompts = ["def f(x):" * 3, "def g(y):" * 4, "x"]  # 27, 36 and 1 tokens
    ids = []
    async with _client(app) as c:
        for p in prompts:
            r = await c.post("/v1/completions", json={"prompt": p, "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": min(8, len(p))}
            ids.append(r.headers["x-zipserve-job-id"])
        backend.cached_tokens = backend.held_tokens = None  # a job that reports nothing
        r = await c.post("/v1/completions", json={"prompt": "abcdefghij", "max_tokens": 2})
        assert r.status_code == 200
        plain = r.headers["x-zipserve-job-id"]
        jobs = {i: (await c.get(f"/v1/jobs/{i}")).json() for i in ids + [plain]}
        metrics = _samples((await c.get("/metrics")).text)
        dash = (await c.get("/dashboard/data")).json()

    cached = [min(8, len(p)) for p in prompts]
    held = [min(16, len(p)) for p in prompts]
    not_sent = [fake_kv_bytes(len(p), "bf16")[0] - fake_kv_bytes(len(p) - h, "bf16")[0]
                for p, h in zip(prompts, held)]  # fmt: skip
    for i, p, cc, h, ns in zip(ids, prompts, cached, held, not_sent):
        j = jobs[i]
        assert (j["cached_tokens"], j["kv_cached_tokens"], j["kv_bytes_not_sent"]) == (cc, h, ns)
        assert j["kv_bytes"] == fake_kv_bytes(len(p) - h, "bf16")[0]
    assert jobs[plain]["cached_tokens"] is None and jobs[plain]["kv_bytes_not_sent"] is None

    label = (("codec", "bf16"),)
    assert metrics[("zipserve_prompt_cached_tokens_total", label)] == sum(cached)
    assert metrics[("zipserve_prompt_tokens_cache_reported_total", label)] == sum(map(len, prompts))
    assert metrics[("zipserve_kv_cached_tokens_total", label)] == sum(held)
    assert metrics[("zipserve_kv_bytes_not_sent_total", label)] == sum(not_sent)
    rate = sum(cached) / sum(map(len, prompts))  # the job reporting nothing is not counted
    assert metrics[("zipserve_prefix_cache_hit_rate", label)] == pytest.approx(rate)

    row = {c["codec"]: c for c in dash["codecs"]}["bf16"]
    assert row["cache_jobs"] == 3 and row["cached_tokens"] == sum(cached)
    assert row["hit_rate"] == pytest.approx(rate)
    assert row["kv_cached_tokens"] == sum(held) and row["kv_bytes_not_sent"] == sum(not_sent)
    by_id = {j["id"]: j for j in dash["jobs"]}
    assert by_id[ids[1]]["cached_tokens"] == 8 and by_id[ids[1]]["kv_cached_tokens"] == 16
    assert by_id[plain]["cached_tokens"] is None


def test_worker_cache_gauges_skip_workers_without_a_cache():
    m = RouterMetrics()
    workers = [
        {"name": "prefill-0", "role": "prefill", "codec": "hack2", "cached_pages": 12},
        {"name": "decode-0", "role": "decode", "codec": "hack2", "cached_pages": 30},
        {"name": "fake-decode-1", "role": "decode", "codec": "hack2"},  # reports no cache
    ]
    workers[0]["cache_hit_rate"], workers[1]["cache_hit_rate"] = 0.5, None  # no lookup yet
    m.set_live({"status": "ok", "workers": workers}, [])
    s = _samples(m.render().decode())
    pages = {k[1]: v for k, v in s.items() if k[0] == "zipserve_worker_cached_pages"}
    assert sorted(dict(lab)["worker"] for lab in pages) == ["decode-0", "prefill-0"]
    assert sorted(pages.values()) == [12, 30]
    rates = {
        dict(k[1])["worker"]: v
        for k, v in s.items()
        if k[0] == "zipserve_worker_prefix_cache_hit_rate"
    }
    assert rates == {"prefill-0": 0.5}
