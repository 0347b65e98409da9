"""The dashboard in a real browser: a uvicorn server on 127.0.0.1 with `FakeBackend` serves a few
requests, then headless Debian chromium loads /dashboard (which polls /dashboard/data) and the
rendered DOM must hold every served job in the JCT chart, nonzero percentiles, the codecs and
the failure. A screenshot is saved under $ZIPSERVE_TEST_ARTIFACTS (default: test-artifacts/).

Without chromium the test skips, except under CI=1 (set by .ci/run), where it fails.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fake_backend import FakeBackend

from zipserve.deploy.serve import serve_in_thread
from zipserve.router.app import create_app
from zipserve.transfer.ports import bind_socket

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_TIMEOUT_S = 120


def chromium() -> str:
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if path is None:
        if os.environ.get("CI") == "1":
            pytest.fail("chromium is not installed but CI=1: .ci/run must apt-get install it")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return path


def artifacts_dir() -> Path:
    d = Path(os.environ.get("ZIPSERVE_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_chromium(binary: str, profile: Path, url: str, *extra: str) -> str:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *extra,
        url,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


@contextmanager
def serving(app):
    """uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = bind_socket("127.0.0.1", 0)
    with serve_in_thread(
        app, sock, "uvicorn-dashboard-test", 10, log_level="warning", lifespan="on"
    ):
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def section(dom: str, section_id: str) -> str:
    m = re.search(rf'<section[^>]*id="{section_id}"[^>]*>(.*?)</section>', dom, re.DOTALL)
    assert m, f"section #{section_id} missing from the rendered page"
    return m.group(1)


def cell_value(dom: str, cell_id: str) -> float:
    m = re.search(
        rf'id="{cell_id}"[^>]*data-value="([^"]*)"|data-value="([^"]*)"[^>]*'
        rf'id="{cell_id}"',
        dom,
    )
    assert m, f"#{cell_id} missing from the rendered page"
    raw = m.group(1) if m.group(1) is not None else m.group(2)
    assert raw, f"#{cell_id} has no value"
    return float(raw)


def test_dashboard_renders_served_jobs_in_chromium(tmp_path):
    binary = chromium()
    backend = FakeBackend(max_model_len=256, phase_delay=0.003, token_delay=0.003)
    with serving(create_app(backend)) as base, httpx.Client(base_url=base, timeout=10) as c:
        served = []
        backend.cached_tokens, backend.held_tokens = 4, 8  # prefix-cache hits on both sides
        for i, codec in enumerate(["bf16", "fp8", "hack4", "kivi2", "hack4"]):
            r = c.post(
                "/v1/completions",
                json={
                    "prompt": "def f(x):" * (i + 1),
                    "max_tokens": 4 + 3 * i,
                    "codec": codec,
                    "stream": i == 3,
                },
            )
            assert r.status_code == 200, r.text
            served.append(r.headers["x-zipserve-job-id"])
        backend.cached_tokens = backend.held_tokens = None
        backend.fail_message, backend.fail_after_tokens = "KV transfer missed its deadline", 2
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 8})
        assert r.status_code == 500
        failed = r.headers["x-zipserve-job-id"]
        backend.fail_message = None

        dom = run_chromium(binary, tmp_path / "profile", f"{base}/dashboard", "--dump-dom")
        shot = artifacts_dir() / "dashboard_fake_backend.png"
        shot.unlink(missing_ok=True)
        run_chromium(
            binary,
            tmp_path / "profile",
            f"{base}/dashboard",
            f"--screenshot={shot}",
            "--window-size=1400,1000",
            "--hide-scrollbars",
        )
    assert not backend.active

    (artifacts_dir() / "dashboard_fake_backend.html").write_text(dom)
    error = re.search(r'<span id="error">(.*?)</span>', dom, re.DOTALL)
    assert error and not error.group(1).strip(), f"the page reported: {error and error.group(1)}"
    chart = section(dom, "jct-chart")
    bars = re.findall(r'<g class="job-bar" data-job-id="([0-9a-f]+)" data-state="(\w+)"', chart)
    assert [b[0] for b in bars] == [failed, *reversed(served)], bars  # newest on top
    assert dict(bars)[failed] == "FAILED"
    assert all(dict(bars)[j] == "DONE" for j in served)
    assert chart.count('class="phase-decode"') == len(served) + 1
    for key in ("ttft", "tbt", "jct"):
        for p in ("p50", "p99"):
            assert cell_value(dom, f"{key}-{p}") > 0
    assert int(re.search(r'id="jct-count">(\d+)<', dom).group(1)) == len(served)
    kv = section(dom, "kv-panel")
    assert set(re.findall(r'data-codec="([\w+]+)"', kv)) == {"bf16", "fp8", "hack4", "kivi2"}
    cache = section(dom, "cache-panel")
    rows = re.findall(
        r'<tr class="cache-row" data-codec="([\w+]+)"><td>[\w+]+</td><td[^>]*>([^<]+)<', cache
    )
    assert {c for c, _ in rows} == {"bf16", "fp8", "hack4", "kivi2"}
    # 4 of each prompt's 9 * (i + 1) tokens: bf16 4/9, hack4 (4 + 4)/(27 + 45)
    assert dict(rows)["bf16"] == "44.4%" and dict(rows)["hack4"] == "11.1%", rows
    failures = html.unescape(section(dom, "failures-panel"))
    assert "failed: deadline × 1" in failures and f'data-job-id="{failed}"' in failures
    pool = section(dom, "pool-panel")
    assert 'data-worker="fake-decode-0"' in pool and "0 / 256 pages used" in pool
    for name in ("ttft-svg", "tbt-svg", "jctp-svg", "tput-svg"):
        m = re.search(rf'id="{name}">(.*?)</div>', dom, re.DOTALL)
        assert m and "<path" in m.group(1), f"#{name} drew no line"
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, len(png)
