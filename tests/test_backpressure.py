"""Backpressure from decode memory to admission, with the real Ray backend on CPU: with a decode
pool that holds one request at a time, a second request waits (no 503) and is prefilled only
after the first has finished and freed its pages, so prefill never computes KV that no decode
worker can take; a request that can never fit fails at once, naming the pages it needs."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from zipserve.control.config import ServeConfig
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.serve import running_server

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=90) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _job(base: str, job_id: str) -> dict:
    with urllib.request.urlopen(f"{base}/v1/jobs/{job_id}", timeout=10) as r:
        return json.loads(r.read())


def test_second_request_waits_for_decode_pages_before_prefill(local_ray):
    # 4 pages of 64 tokens, one of them the engine's scratch page: 3 for requests, and a
    # 150-token prompt reserves 3, so only one fits at a time
    cfg = ServeConfig(model=MODEL, codec="bf16", engine_options={"num_pages": 4})
    with running_server(cfg, "127.0.0.1", 0) as (base, backend):
        url = f"{base}/v1/completions"
        outs: dict[str, tuple[int, dict]] = {}

        def send(name: str, first_token: int) -> None:
            prompt = list(range(first_token, first_token + 150))
            outs[name] = _post(url, {"prompt": prompt, "max_tokens": 24, "temperature": 0})

        a = threading.Thread(target=send, args=("a", 3))
        a.start()
        end = time.time() + 30
        while not backend.prefilling[0] and "a" not in outs and time.time() < end:
            time.sleep(0.01)  # a holds its decode pages and is in prefill
        b = threading.Thread(target=send, args=("b", 500))
        b.start()
        a.join(90)
        b.join(90)
        (sa, oa), (sb, ob) = outs["a"], outs["b"]
        assert sa == 200 and sb == 200, (oa, ob)
        ja, jb = _job(base, oa["id"]), _job(base, ob["id"])
        b_prefill = next(p for p in jb["phases"] if p["name"] == "prefill")
        # b's pages came free when a finished; only then was b prefilled
        assert b_prefill["start"] >= ja["finished_at"], (ja, jb)
        queue = next(p for p in jb["phases"] if p["name"] == "queue")
        assert queue["duration"] > 0
        stats = ray.get(backend.prefill[0].stats.remote())
        assert stats.prefills == 2  # no prefill was computed and thrown away

        t0 = time.time()
        status, err = _post(url, {"prompt": list(range(3, 303)), "max_tokens": 4})
        assert status == 503 and "needs 5 KV pages" in err["error"]["message"], err
        assert time.time() - t0 < 5  # refused at once, not after the page wait

        dec = ray.get(backend.decode[0].stats.remote())
        assert dec.free_pages == dec.capacity_pages == 3, dec
        assert dec.reserved == 0 and dec.running == 0
