"""Failures on CPU with the real Ray backend and uvicorn: a decode actor killed mid-stream ends
its request with a clear error, Ray restarts it, /health shows it down and then up, and serving
resumes on fresh channels; a prefill actor killed mid-request gets the request retried on the
other pair; transfer-deadline expiry and checksum mismatch are counted by reason; no pages leak
anywhere, also when a request times out in the middle of its KV transfer."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from net_helpers import stream_and_interrupt

from zipserve.compress.wire import LayerKV
from zipserve.control.config import ServeConfig
from zipserve.decode_worker.worker import DecodeWorker
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.serve import running_server
from zipserve.engine.sampling_params import SamplingParams
from zipserve.prefill_worker.worker import KV_TAG, PrefillWorker
from zipserve.transfer.inprocess import InProcessChannel

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
LONG_PROMPT = "import os\nimport sys\n" * 30


@pytest.fixture(scope="module")
def server(local_ray):
    """Two prefill workers and one decode worker; a slow emulated link keeps each prefill call
    busy for ~0.5 s, long enough to kill the worker under it."""
    cfg = ServeConfig(
        model=MODEL,
        codec="bf16",
        num_prefill=2,
        health_interval_s=0.2,
        max_restarts=2,
        link_gbps=0.03,
    )
    with running_server(cfg, "127.0.0.1", 0) as (base, backend):
        yield base, backend


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _health(base: str) -> dict:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while no pair is usable
        return json.loads(e.read())


def _worker(health: dict, name: str) -> dict:
    return next(w for w in health["backend"]["workers"] if w["name"] == name)


def _wait_until(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _assert_pools_whole(backend) -> None:
    def whole():
        stats = ray.get([a.stats.remote() for a in backend.prefill + backend.decode])
        ok = all(s.free_pages == s.capacity_pages for s in stats) and all(
            s.reserved == 0 and s.running == 0 for s in stats[len(backend.prefill) :]
        )
        return stats if ok else None

    _wait_until(whole, 10, "every page back in its pool")


def test_decode_killed_mid_stream_fails_fast_restarts_and_serving_resumes(server):
    base, backend = server
    health = _health(base)
    assert health["status"] == "ok"
    workers = {w["name"]: w for w in health["backend"]["workers"]}
    assert set(workers) == {"prefill-0", "prefill-1", "decode-0"}
    for w in workers.values():
        assert w["healthy"] and w["codec"] == "bf16" and w["role"] in ("prefill", "decode")
        assert {"free_pages", "used_pages", "queued_tokens", "running"} <= set(w)

    error, t_kill = stream_and_interrupt(
        f"{base}/v1/completions",
        {"prompt": LONG_PROMPT, "max_tokens": 1000, "temperature": 0},
        3,
        lambda: ray.kill(backend.decode[0], no_restart=False),
    )
    assert error is not None and "decode worker" in error, error
    assert time.time() - t_kill < 5, "the stream did not end soon after the worker died"

    down = _wait_until(
        lambda: not _worker(_health(base), "decode-0")["healthy"],
        10,
        "/health to report decode-0 down",
    )
    assert down
    up = _wait_until(
        lambda: (w := _worker(_health(base), "decode-0"))["healthy"] and w["restarts"] == 1 and w,
        60,
        "decode-0 back after its restart",
    )
    assert up["free_pages"] > 0
    status, out = _post(
        f"{base}/v1/completions", {"prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0}
    )
    assert status == 200 and out["usage"]["completion_tokens"] == 8, out
    _wait_until(
        lambda: all(_health(base)["backend"]["pairs"].values()), 20, "both pairs connected again"
    )
    for _ in range(2):  # the pair of each prefill worker serves again
        status, out = _post(f"{base}/v1/completions", {"prompt": "x = 1", "max_tokens": 2})
        assert status == 200, out
    h = _health(base)["backend"]
    assert h["failures"]["decode_worker_died"] >= 1 and h["events"]["worker_restarted"] >= 1
    _assert_pools_whole(backend)


def test_prefill_killed_mid_request_is_retried_on_the_other_pair(server):
    base, backend = server
    retried = backend.counts["retried"]
    result = {}
    t = threading.Thread(
        target=lambda: result.update(
            out=_post(
                f"{base}/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 6, "temperature": 0}
            )
        )
    )
    t.start()
    victim = (
        _wait_until(
            lambda: (
                next((i for i, n in backend.prefilling.items() if n), None) is not None
                and next(i for i, n in backend.prefilling.items() if n) + 1
            ),
            20,
            "the request to reach a prefill worker",
        )
        - 1
    )
    ray.kill(backend.prefill[victim], no_restart=False)
    t.join(60)
    status, out = result["out"]
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 6
    assert backend.counts["retried"] == retried + 1
    assert backend.counts["prefill_worker_died"] == 1

    name = f"prefill-{victim}"
    _wait_until(
        lambda: (w := _worker(_health(base), name))["healthy"] and w["restarts"] == 1,
        60,
        f"{name} back after its restart",
    )
    _wait_until(
        lambda: all(_health(base)["backend"]["pairs"].values()), 20, "both pairs connected again"
    )
    # both pairs serve again: a burst spreads over the two prefill workers
    before = [s.prefills for s in ray.get([p.stats.remote() for p in backend.prefill])]
    outs = []
    threads = [
        threading.Thread(
            target=lambda: outs.append(
                _post(f"{base}/v1/completions", {"prompt": "def f(x):", "max_tokens": 2})
            )
        )
        for _ in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert [s for s, _ in outs] == [200] * 4, outs
    after = [s.prefills for s in ray.get([p.stats.remote() for p in backend.prefill])]
    assert after[victim] > before[victim], (before, after)

    # a reservation whose KV never comes is expired at its deadline, and counted
    ray.get(
        backend.decode[0].reserve.remote(
            "orphan", list(range(3, 50)), SamplingParams(max_tokens=2), 0.3
        )
    )
    _wait_until(
        lambda: backend.health()["failures"].get("transfer_deadline") == 1,
        10,
        "the expired reservation to be counted",
    )
    ray.get(backend.decode[0].release.remote("orphan"))
    _assert_pools_whole(backend)


def test_timeout_mid_transfer_frees_every_page(server):
    base, backend = server
    t0 = time.time()
    # a prompt no earlier test sent: the decode worker's prefix cache holds none of it, so all
    # of its KV must cross the slow link (a cached prompt would be done well within 0.3 s)
    prompt = "# timed out\n" + LONG_PROMPT
    status, out = _post(
        f"{base}/v1/completions", {"prompt": prompt, "max_tokens": 50, "timeout": 0.3}
    )
    assert status == 504 and out["error"]["code"] == "request_timeout", out
    assert time.time() - t0 < 5
    _assert_pools_whole(backend)  # the reservation was released, the late KV dropped
    status, out = _post(f"{base}/v1/completions", {"prompt": "x = 1", "max_tokens": 2})
    assert status == 200, out


def _in_process_pair():
    a, b = InProcessChannel.pair()
    pre, dec = PrefillWorker(MODEL, "hack2", "cpu"), DecodeWorker(MODEL, "hack2", "cpu")
    pre.attach("d0", a)
    dec.attach("p0", b)
    return pre, dec, a


def test_checksum_mismatch_and_deadline_are_counted_by_reason():
    pre, dec, chan = _in_process_pair()
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0)
        prompt = list(range(3, 200))  # 3 pages: full pages cross the wire encoded
        dec.reserve("ok", prompt, params)
        pre.prefill("ok", prompt, params, "d0")
        good = dec.admit("ok", 1, None, timeout=5)
        assert not good.error

        # the same layer again with one payload byte flipped: the page checksum catches it
        layers = pre.engine.prefill_export(prompt, params, "bad").layers
        kv = layers[0]
        pages = bytearray(kv.pages)
        pages[-1] ^= 0xFF
        dec.reserve("bad", prompt, params)
        chan.send(LayerKV(kv.layer, kv.num_tokens, bytes(pages), kv.tail, "bad").to_bytes(), KV_TAG)
        res = dec.admit("bad", 1, None, timeout=5)
        assert res.finish_reason == "error" and "checksum mismatch" in res.error

        dec.reserve("late", prompt, params, deadline_s=0.2)
        res = dec.admit("late", 1, None, timeout=0.4)
        assert res.finish_reason == "error" and "missed its deadline" in res.error

        stats = dec.stats()
        assert stats.failures == {"checksum_mismatch": 1, "transfer_deadline": 1}, stats
        for rid in ("ok", "bad", "late"):
            dec.abort(rid)
            dec.release(rid)
        _wait_until(
            lambda: (
                (s := dec.stats()).free_pages == s.capacity_pages
                and s.running == 0
                and s.reserved == 0
            ),
            5,
            "the decode pool whole",
        )
    finally:
        dec.shutdown()
