"""End to end on CPU: a real uvicorn server on loopback, local Ray, prefill and decode actors
connected by gloo; greedy output over HTTP equals the offline engine for every codec, streaming
included, and afterwards every page of the decode pool is free."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from net_helpers import decode_pool_settled, stream_and_interrupt
from net_helpers import post_json as _post
from net_helpers import stream_text as _stream

from zipserve.compress.codecs import CODECS
from zipserve.control.config import ServeConfig
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.serve import running_server
from zipserve.engine.llm import LLM, SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n" * 30]  # 2nd: > 1 page of tokens


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    """Every test here runs against the module's embedded Ray (tests/conftest.py)."""


@pytest.mark.slow
@pytest.mark.parametrize("codec", CODECS)
def test_http_equals_offline_engine(codec):
    # the served lane's decode_kv is ServeConfig's default, auto (dense on the CPU): the offline
    # engine resolves it the same way (a lowrank page sealed to codes would drift from it)
    want = LLM(MODEL, device="cpu", codec=codec, decode_kv="auto").generate(
        PROMPTS, SamplingParams(max_tokens=20, temperature=0.0)
    )
    with running_server(ServeConfig(model=MODEL, codec=codec), "127.0.0.1", 0) as (
        base,
        backend,
    ):
        url = f"{base}/v1/completions"
        for prompt, w in zip(PROMPTS, want):
            out = _post(url, {"prompt": prompt, "max_tokens": 20, "temperature": 0})
            assert out["choices"][0]["text"] == w.text
            assert out["usage"]["completion_tokens"] == len(w.token_ids)
            job = json.loads(urllib.request.urlopen(f"{base}/v1/jobs/{out['id']}").read())
            names = [p["name"] for p in job["phases"]]
            assert {"queue", "prefill", "transfer", "decode"} <= set(names)
            assert job["state"] == "DONE" and 0 < job["ttft"] <= job["jct"]
            assert job["kv_bytes"] > 0  # what prefill sent, and what bf16 would have needed
            assert (
                job["kv_bytes_bf16"]
                == out["usage"]["prompt_tokens"] * backend.kv_bytes_per_token_bf16
            )
        assert (
            _stream(url, {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}) == want[0].text
        )
        stats = decode_pool_settled(backend)
        assert stats.free_pages == stats.capacity_pages, stats
        assert stats.reserved == 0 and stats.running == 0, stats


def test_one_deployment_serves_several_codecs_per_request():
    """--codec hack2,bf16: a lane of workers per codec; a request's codec picks its lane (none:
    the first), each output equals that codec's offline engine, an unserved codec is a 400
    naming the field, and every lane's pages come back."""
    want = {
        c: LLM(MODEL, device="cpu", codec=c).generate(
            PROMPTS[1:], SamplingParams(max_tokens=12, temperature=0.0)
        )[0]
        for c in ("hack2", "bf16")
    }
    cfg = ServeConfig(model=MODEL, codec="hack2", extra_codecs=("bf16",))
    with running_server(cfg, "127.0.0.1", 0) as (base, backend):
        url = f"{base}/v1/completions"
        sent = {}
        for codec, expect in [(None, "hack2"), ("bf16", "bf16"), ("hack2", "hack2")]:
            body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}
            out = _post(url, body if codec is None else dict(body, codec=codec))
            assert out["choices"][0]["text"] == want[expect].text, codec
            job = json.loads(urllib.request.urlopen(f"{base}/v1/jobs/{out['id']}").read())
            assert job["codec"] == expect
            sent[codec] = job["kv_bytes"], job["local_prefill"]
        assert sent[None][0] < sent["bf16"][0] / 2  # the KV really went compressed
        # the same prompt again: the hack2 decode worker holds all of it but its partly filled
        # last page (prefix caching) and computes that itself; nothing crosses the link
        assert sent["hack2"] == (0, True) and sent[None][1] is False
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(url, {"prompt": "x", "max_tokens": 2, "codec": "fp8"})
        err = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and err["param"] == "codec" and "hack2, bf16" in err["message"]
        health = json.loads(urllib.request.urlopen(f"{base}/health").read())
        names = {w["name"] for w in health["backend"]["workers"]}
        assert {"hack2/prefill-0", "hack2/decode-0", "bf16/prefill-0", "bf16/decode-0"} <= names
        assert health["backend"]["lanes"] == {"hack2": "ok", "bf16": "ok"}
        for lane in backend.lanes.values():
            stats = decode_pool_settled(lane)
            assert stats.free_pages == stats.capacity_pages and stats.reserved == 0, stats


@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_http_equals_offline_engine_lckv(codec, tmp_path):
    """An LCKV checkpoint (only its KV layers have pages, are encoded and sent) serves over HTTP
    exactly as the offline engine generates."""
    from lckv_fixtures import write_tiny_lckv_checkpoint

    write_tiny_lckv_checkpoint(tmp_path)
    model = str(tmp_path)
    want = LLM(model, device="cpu", codec=codec).generate(
        PROMPTS, SamplingParams(max_tokens=12, temperature=0.0)
    )
    with running_server(ServeConfig(model=model, codec=codec), "127.0.0.1", 0) as (
        base,
        backend,
    ):
        for prompt, w in zip(PROMPTS, want):
            out = _post(
                f"{base}/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0}
            )
            assert out["choices"][0]["text"] == w.text
        stats = decode_pool_settled(backend)
        assert stats.free_pages == stats.capacity_pages, stats


def test_disconnect_frees_pages_and_dead_prefill_fails_clearly():
    """A client that drops a stream gets its job aborted and its decode pages freed within a
    second; with the prefill worker killed, a request fails with a clear 5xx and leaks nothing."""
    import http.client

    with running_server(ServeConfig(model=MODEL, codec="hack2"), "127.0.0.1", 0) as (
        base,
        backend,
    ):
        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(
            "POST",
            "/v1/completions",
            json.dumps(
                {
                    "prompt": PROMPTS[1],
                    "max_tokens": 1000,
                    "temperature": 0,
                    "stream": True,
                    "ignore_eos": True,
                }
            ),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        got = 0
        while got < 3:  # a few tokens arrive, then the client goes away
            if resp.readline().startswith(b"data: "):
                got += 1
        busy = ray.get(backend.decode[0].stats.remote())
        assert busy.used_pages > 0
        t_drop = time.time()
        conn.sock.close()
        conn.close()
        stats = decode_pool_settled(backend, deadline_s=1.5)
        assert stats.free_pages == stats.capacity_pages, stats
        assert time.time() - t_drop < 1.5

        ray.kill(backend.prefill[0])
        req = urllib.request.Request(
            f"{base}/v1/completions",
            data=json.dumps({"prompt": PROMPTS[0], "max_tokens": 5}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(req, timeout=60)
            raise AssertionError("a request with a dead prefill worker succeeded")
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            assert e.code in (500, 503) and "prefill worker" in body["error"]["message"]
        stats = decode_pool_settled(backend)
        assert stats.free_pages == stats.capacity_pages and stats.reserved == 0, stats


def test_streamed_text_never_shows_what_a_stop_string_cuts():
    params = SamplingParams(max_tokens=40, temperature=0.0)
    full = LLM(MODEL, device="cpu", codec="hack4").generate(PROMPTS[0], params)[0].text
    stop = full[12:15]  # a stop string that appears in the greedy output
    want = full[: full.index(stop)]
    with running_server(ServeConfig(model=MODEL, codec="hack4"), "127.0.0.1", 0) as (
        base,
        backend,
    ):
        body = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stop": [stop]}
        assert _post(f"{base}/v1/completions", body)["choices"][0]["text"] == want
        assert _stream(f"{base}/v1/completions", body) == want
        stats = decode_pool_settled(backend)
        assert stats.free_pages == stats.capacity_pages, stats


def test_decode_worker_dying_mid_stream_ends_the_stream_with_an_error():
    with running_server(ServeConfig(model=MODEL, codec="hack4"), "127.0.0.1", 0) as (
        base,
        backend,
    ):
        error, t0 = stream_and_interrupt(
            f"{base}/v1/completions",
            {"prompt": PROMPTS[1], "max_tokens": 1000, "temperature": 0},
            3,
            lambda: ray.kill(backend.decode[0]),
        )
        assert error is not None and "decode worker" in error
        assert t0 is not None and time.time() - t0 < 10  # no hang: the stream ended soon after
