"""/dashboard and /dashboard/data without a browser: the page is self-contained (no URL outside
the router, shipped as package data), the JSON holds the served jobs, percentiles, KV bytes per
codec, workers and failures, and the time series put jobs in the right buckets."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from fake_backend import FakeBackend, fake_kv_bytes

from zipserve.router.app import create_app
from zipserve.router.dashboard import dashboard_html
from zipserve.router.dashboard_data import JobSample, series

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SVG_NS = "http://www.w3.org/2000/svg"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_page_fetches_nothing_from_outside():
    page = dashboard_html()
    urls = re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>)]*", page, re.IGNORECASE)
    assert set(urls) <= {SVG_NS}, urls  # the SVG namespace is a name, never fetched
    assert not re.search(r"\b(?:src|href)\s*=", page, re.IGNORECASE)
    assert "@import" not in page and "url(" not in page
    assert "<link" not in page.lower()
    csp = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]+)"', page)
    assert csp and "default-src 'none'" in csp.group(1) and "connect-src 'self'" in csp.group(1)


def test_page_ships_as_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["zipserve.router"]
    assert any((ROOT / "router").glob(g) for g in globs)
    assert "prometheus-client" in " ".join(cfg["project"]["dependencies"])


async def test_dashboard_data_holds_the_served_jobs():
    backend = FakeBackend(max_model_len=256)
    app = create_app(backend)
    ids, prompts = [], {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    ) as c:
        page = await c.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for codec in ("bf16", "hack4", "hack4"):
            r = await c.post(
                "/v1/completions", json={"prompt": "def g():", "max_tokens": 4, "codec": codec}
            )
            assert r.status_code == 200
            ids.append(r.headers["x-zipserve-job-id"])
            prompts[codec] = r.json()["usage"]["prompt_tokens"]
        backend.fail_message, backend.fail_after_tokens = "KV transfer missed its deadline", 1
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
        failed_id = r.headers["x-zipserve-job-id"]
        backend.fail_message = None
        d = (await c.get("/dashboard/data")).json()

    assert [j["id"] for j in d["jobs"]] == [failed_id, *reversed(ids)]  # newest first
    for j in d["jobs"]:
        assert [p["name"] for p in j["phases"]][:5] == [
            "queue",
            "prefill",
            "encode",
            "transfer",
            "decode_queue",
        ]
        covered = sum(p["duration"] for p in j["phases"])
        assert covered <= j["elapsed"] + 1e-6 and j["elapsed"] > 0
    done = [j for j in d["jobs"] if j["state"] == "DONE"]
    assert len(done) == 3 and all(j["jct"] == j["elapsed"] for j in done)
    assert d["summary"]["jct"]["count"] == 3 and d["summary"]["ttft"]["count"] == 4
    assert 0 < d["summary"]["ttft"]["p50"] <= d["summary"]["ttft"]["p99"]
    assert d["summary"]["tbt"]["count"] == 3 * 3 + 0  # 4 tokens: 3 gaps; the failed job: 1 token
    codecs = {c["codec"]: c for c in d["codecs"]}
    sent, dense = fake_kv_bytes(prompts["hack4"], "hack4")
    assert codecs["hack4"]["jobs"] == 2
    assert codecs["hack4"]["kv_bytes"] == 2 * sent
    assert codecs["hack4"]["saved_bytes"] == 2 * (dense - sent)
    assert codecs["hack4"]["ratio"] == pytest.approx(dense / sent)
    assert codecs["bf16"]["ratio"] == pytest.approx(1.0)
    assert [f["job_id"] for f in d["failures"]] == [failed_id]
    assert d["failures"][0]["reason"] == "deadline"
    assert {"outcome": "failed", "reason": "deadline", "codec": "bf16", "count": 1} in d["outcomes"]
    assert {w["name"] for w in d["workers"]} == {"fake-prefill-0", "fake-decode-0"}
    assert sum(x for x in d["series"]["requests_per_s"]) * d["series"]["bucket_s"] == 4


def _sample(t: float, ttft: float, jct: float, tokens: int = 3) -> JobSample:
    return JobSample(
        job_id=f"j{t}",
        finished_at=t,
        codec="bf16",
        outcome="done",
        reason="length",
        ttft=ttft,
        jct=jct,
        gaps=(0.01,) * (tokens - 1),
        prompt_tokens=5,
        completion_tokens=tokens,
        kv_bytes=None,
        kv_bytes_bf16=None,
        error=None,
    )


def test_series_buckets_and_percentiles():
    now = 1000.0
    samples = [_sample(960.5, 0.1, 1.0), _sample(960.7, 0.3, 2.0), _sample(999.5, 0.2, 4.0)]
    s = series(samples, now)
    assert s["bucket_s"] == 1  # 40 s of history in 1 s buckets
    assert len(s["t"]) == 40 and s["t"][-1] == now
    first = s["t"].index(961.0)
    assert s["ttft_p50"][first] == pytest.approx(0.2)
    assert s["ttft_p99"][first] == pytest.approx(0.1 + 0.2 * 0.99)
    assert s["jct_p50"][first] == pytest.approx(1.5)
    assert s["tokens_per_s"][first] == pytest.approx(6.0)
    assert s["ttft_p50"][-1] == pytest.approx(0.2) and s["jct_p99"][-1] == pytest.approx(4.0)
    assert s["ttft_p50"][first + 1] is None and s["requests_per_s"][first + 1] == 0
    long = series([_sample(now - 600, 0.1, 1.0)], now)
    assert long["bucket_s"] == 15 and len(long["t"]) <= 41
