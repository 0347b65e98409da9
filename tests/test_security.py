"""Security of the HTTP surface: loopback bind by default, API key (every route but /health,
compared in constant time, read from a file), body size limit (413), nothing unpickled from
HTTP, CORS off by default."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import httpx
import pytest
from fake_backend import FakeBackend

import zipserve.router.auth as auth
from zipserve.deploy.cli import build_parser
from zipserve.router.app import create_app
from zipserve.router.auth import read_api_key
from zipserve.router.limits import AdmissionConfig

pytestmark = pytest.mark.anyio
ROUTER_DIR = Path(auth.__file__).resolve().parent
KEY = "k3y-0123456789"
STATIC_PAGES = {"/dashboard"}
"""Routes left open because they serve a fixed HTML page only (their data is behind the key)."""


@pytest.fixture
def anyio_backend():
    return "asyncio"


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    )


def route_paths(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, with path parameters filled in."""
    out = []
    for r in app.routes:
        for m in sorted(getattr(r, "methods", None) or ()):
            if m in ("HEAD", "OPTIONS"):
                continue
            out.append((m, re.sub(r"\{[^}]+\}", "x", r.path)))
    return out


def test_serve_binds_loopback_unless_host_says_otherwise():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    assert build_parser().parse_args(["serve", "--host", "0.0.0.0"]).host == "0.0.0.0"


async def test_api_key_guards_every_route_but_health(monkeypatch):
    backend = FakeBackend()
    app = create_app(backend, api_key=KEY)
    compared = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    routes = route_paths(app)
    assert ("GET", "/health") in routes and ("POST", "/v1/completions") in routes
    async with client_for(app) as c:
        for method, path in routes:
            if path == "/health":
                continue
            if path in STATIC_PAGES:
                r = await c.request(method, path)
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
                assert not backend.jobs
                continue
            for headers in ({}, {"Authorization": "Bearer nope"}):
                r = await c.request(method, path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        assert not backend.jobs  # nothing ran
        assert (b"nope", KEY.encode()) in compared  # the constant-time comparison decided
        assert (await c.get("/health")).status_code == 200  # open for probes
        ok = {"Authorization": f"Bearer {KEY}"}
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=ok)
        assert r.status_code == 200
        assert (await c.get("/v1/jobs", headers=ok)).status_code == 200


def test_api_key_file(tmp_path):
    f = tmp_path / "key"
    f.write_text(f"{KEY}\n")
    assert read_api_key(None, str(f)) == KEY
    assert read_api_key(KEY, None) == KEY and read_api_key(None, None) is None
    with pytest.raises(ValueError, match="not both"):
        read_api_key(KEY, str(f))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(None, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--api-key-file"):
        read_api_key(None, str(tmp_path / "missing"))


async def test_body_size_limit_413():
    backend = FakeBackend(max_model_len=8192)
    app = create_app(backend, limits=AdmissionConfig(max_body_bytes=4096))
    async with client_for(app) as c:
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        r = await c.post("/v1/completions", json=big)  # announced by Content-Length
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunks():  # no Content-Length: counted while it streams in
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = await c.post("/v1/completions", content=chunks())
        assert r.status_code == 413 and "4096" in r.json()["error"]["message"]
        assert not backend.jobs
        ok = await c.post("/v1/completions", json={"prompt": "x" * 3000, "max_tokens": 1})
        assert ok.status_code == 200


async def test_nothing_is_unpickled_from_http(tmp_path):
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps(Bomb())
    app = create_app(FakeBackend())
    async with client_for(app) as c:
        for ctype in ("application/python-pickle", "application/octet-stream", "application/json"):
            r = await c.post("/v1/completions", content=payload, headers={"Content-Type": ctype})
            assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert not marker.exists()
    # and no router module can deserialize anything but JSON
    for src in ROUTER_DIR.glob("*.py"):
        text = src.read_text()
        for banned in (
            "import pickle",
            "cloudpickle",
            "torch.load",
            "marshal",
            "yaml.load",
            "eval(",
        ):
            assert banned not in text, f"{src.name} uses {banned}"


async def test_cors_is_off_by_default():
    app = create_app(FakeBackend())
    async with client_for(app) as c:
        pre = await c.options(
            "/v1/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code in (404, 405)
        r = await c.post(
            "/v1/completions",
            json={"prompt": "x", "max_tokens": 1},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status_code == 200
        for resp in (pre, r, await c.get("/health", headers={"Origin": "http://evil.example"})):
            assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
