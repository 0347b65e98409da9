"""`zipserve serve --prefill-group 2` end to end on CPU: long prompts go to a 2-actor gloo
prefill group, short ones to the ordinary prefill worker; greedy output over HTTP equals the
offline engine and every decode page is free afterwards."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from net_helpers import free_port as _port, post_json as _post
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.ray_backend import ServeConfig
from zipserve.deploy.serve import running_server
from zipserve.engine.llm import LLM, SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not (REFERENCE_MODEL / "config.json").exists(),
                                reason="reference checkpoint not present")
MODEL = str(REFERENCE_MODEL)
LONG = "import os\nimport sys\n\n\ndef main(argv):\n    return len(argv)\n" * 12
SHORT = "def fibonacci(n):"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_http_with_prefill_group_equals_offline_engine(codec):
    opts = {"page_size": 32}
    llm = LLM(MODEL, device="cpu", codec=codec, **opts)
    assert len(llm.tokenizer.encode(LONG)) >= 64 > len(llm.tokenizer.encode(SHORT))
    want = llm.generate([LONG, SHORT], SamplingParams(max_tokens=12, temperature=0.0))
    cfg = ServeConfig(model=MODEL, codec=codec, prefill_group=2,
                      prefill_group_min_tokens=64, engine_options=opts)
    with running_server(cfg, "127.0.0.1", _port()) as (base, backend):
        url = f"{base}/v1/completions"
        for prompt, w in [(LONG, want[0]), (SHORT, want[1])]:
            out = _post(url, {"prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert out["choices"][0]["text"] == w.text
            assert backend.prefill_group.prompts_run == 1  # the long prompt only
            job = json.loads(urllib.request.urlopen(f"{base}/v1/jobs/{out['id']}").read())
            assert job["state"] == "DONE" and job["kv_bytes"] > 0
        end = time.time() + 10
        while True:
            stats = ray.get(backend.decode[0].stats.remote())
            if stats["free_pages"] == stats["capacity_pages"] or time.time() > end:
                break
            time.sleep(0.1)
        assert stats["free_pages"] == stats["capacity_pages"], stats
        assert stats["reserved"] == 0 and stats["running"] == 0, stats
        assert stats["dropped_messages"] == 0, stats
