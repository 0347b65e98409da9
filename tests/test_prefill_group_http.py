"""`zipserve serve --prefill-group 2` end to end on CPU: long prompts go to a 2-actor gloo
prefill group, short ones to the ordinary prefill worker; greedy output over HTTP equals the
offline engine and every decode page is free afterwards."""

from __future__ import annotations

import json
import urllib.request

import pytest
from net_helpers import decode_pool_settled
from net_helpers import post_json as _post

from zipserve.control.config import ServeConfig
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.serve import running_server
from zipserve.engine.llm import LLM, SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
LONG = "import os\nimport sys\n\n\ndef main(argv):\n    return len(argv)\n" * 12
SHORT = "def fibonacci(n):"


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    """Every test here runs against the module's embedded Ray (tests/conftest.py)."""


@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_http_with_prefill_group_equals_offline_engine(codec):
    opts = {"page_size": 32}
    llm = LLM(MODEL, device="cpu", codec=codec, **opts)
    assert len(llm.tokenizer.encode(LONG)) >= 64 > len(llm.tokenizer.encode(SHORT))
    want = llm.generate([LONG, SHORT], SamplingParams(max_tokens=12, temperature=0.0))
    cfg = ServeConfig(
        model=MODEL, codec=codec, prefill_group=2, prefill_group_min_tokens=64, engine_options=opts
    )
    with running_server(cfg, "127.0.0.1", 0) as (base, backend):
        url = f"{base}/v1/completions"
        for prompt, w in [(LONG, want[0]), (SHORT, want[1])]:
            out = _post(url, {"prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert out["choices"][0]["text"] == w.text
            assert backend.prefill_group.prompts_run == 1  # the long prompt only
            job = json.loads(urllib.request.urlopen(f"{base}/v1/jobs/{out['id']}").read())
            assert job["state"] == "DONE" and job["kv_bytes"] > 0
        stats = decode_pool_settled(backend)
        assert stats.free_pages == stats.capacity_pages, stats
        assert stats.reserved == 0 and stats.running == 0, stats
        assert stats.dropped_messages == 0, stats


def test_lowrank_full_exchange_flag_reaches_the_group():
    """--prefill-group-exchange full with the lowrank codec: the all-to-alls carry full-width
    Q/K/V (bytes == the formula at head_dim), so the prompt is attended exactly and the first
    token is the uncompressed model's. (One engine's lowrank prefill is not exact: V's basis is
    folded into W_o, so later tokens are compared in tests/test_prefill_group.py, not here.)"""
    from zipserve.engine.loading import model_config_for
    from zipserve.prefill_group.exchange import expected_layer_bytes

    opts = {"page_size": 32}
    llm = LLM(MODEL, device="cpu", codec="bf16", **opts)
    n_tokens = len(llm.tokenizer.encode(LONG))
    first = llm.generate([LONG], SamplingParams(max_tokens=1, temperature=0.0))[0].text
    mc = model_config_for(MODEL)
    per_layer = expected_layer_bytes(
        mc.num_heads, mc.num_kv_heads, 2, mc.head_dim, mc.head_dim, 4, n_tokens
    )  # fp32 on the CPU
    cfg = ServeConfig(
        model=MODEL,
        codec="lowrank",
        prefill_group=2,
        prefill_group_min_tokens=64,
        prefill_group_exchange="full",
        engine_options=opts,
    )
    with running_server(cfg, "127.0.0.1", 0) as (base, backend):
        out = _post(f"{base}/v1/completions", {"prompt": LONG, "max_tokens": 1, "temperature": 0})
        assert out["choices"][0]["text"] == first
        assert backend.prefill_group.prompts_run == 1
        assert backend.prefill_group.exchange_bytes == mc.num_layers * sum(per_layer.values())
        stats = decode_pool_settled(backend)
        assert stats.free_pages == stats.capacity_pages, stats
