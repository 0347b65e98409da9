"""End to end on CPU: a real uvicorn server on loopback, local Ray, prefill and decode actors
connected by gloo; greedy output over HTTP equals the offline engine for every codec, streaming
included, and afterwards every page of the decode pool is free."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

from zipserve.compress.codecs import CODECS
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.ray_backend import ServeConfig
from zipserve.deploy.serve import running_server
from zipserve.engine.llm import LLM, SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not (REFERENCE_MODEL / "config.json").exists(),
                                reason="reference checkpoint not present")
MODEL = str(REFERENCE_MODEL)
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n" * 30]  # 2nd: > 1 page of tokens


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _stream(url, body) -> str:
    req = urllib.request.Request(url, data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    text = ""
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0].get("text") or ""
    return text


def _pool_whole(backend, deadline_s: float = 10.0) -> dict:
    end = time.time() + deadline_s
    while True:
        stats = ray.get(backend.decode[0].stats.remote())
        if (stats["free_pages"] == stats["capacity_pages"] and stats["reserved"] == 0
                and stats["running"] == 0) or time.time() > end:
            return stats
        time.sleep(0.1)


@pytest.mark.parametrize("codec", CODECS)
def test_http_equals_offline_engine(codec):
    want = LLM(MODEL, device="cpu", codec=codec).generate(
        PROMPTS, SamplingParams(max_tokens=20, temperature=0.0))
    with running_server(ServeConfig(model=MODEL, codec=codec), "127.0.0.1", _port()) as (
            base, backend):
        url = f"{base}/v1/completions"
        for prompt, w in zip(PROMPTS, want):
            out = _post(url, {"prompt": prompt, "max_tokens": 20, "temperature": 0})
            assert out["choices"][0]["text"] == w.text
            assert out["usage"]["completion_tokens"] == len(w.token_ids)
            job = json.loads(urllib.request.urlopen(f"{base}/v1/jobs/{out['id']}").read())
            names = [p["name"] for p in job["phases"]]
            assert {"queue", "prefill", "transfer", "decode"} <= set(names)
            assert job["state"] == "DONE" and 0 < job["ttft"] <= job["jct"]
        assert _stream(url, {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}) == \
            want[0].text
        stats = _pool_whole(backend)
        assert stats["free_pages"] == stats["capacity_pages"], stats
        assert stats["reserved"] == 0 and stats["running"] == 0, stats
