"""Prefill on one engine, decode on another, the KV moving layer by layer in its wire form:
the output equals one engine doing both, for every codec; nothing leaks on success or abort."""

from __future__ import annotations

import pytest
from disagg_helpers import hand_over, pool_whole, run_to_completion

from zipserve.compress.codecs import CODECS
from zipserve.compress.wire import LayerKV
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.config import EngineConfig
from zipserve.engine.disaggregated import DisaggregatedEngine, Overloaded
from zipserve.engine.llm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
PROMPTS = [list(range(3, 40)), list(range(100, 230)), list(range(500, 628))]  # 37, 130, 128


def _engine(codec: str, **kw) -> DisaggregatedEngine:
    return DisaggregatedEngine(MODEL, device="cpu", engine_config=EngineConfig(codec=codec, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("codec", CODECS)
def test_disaggregated_equals_single_engine(codec):
    params = SamplingParams(max_tokens=70, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in LLM(MODEL, device="cpu", codec=codec).generate(PROMPTS, params)]
    pre, dec = _engine(codec), _engine(codec)
    hand_over(pre, [dec], PROMPTS, params)  # through bytes, as a channel would carry them
    got = run_to_completion(dec)
    assert [got[f"r{i}"].token_ids for i in range(len(PROMPTS))] == want
    pool_whole(pre)
    pool_whole(dec)


def test_layers_are_handed_out_while_prefill_runs():
    """Layer l is handed out when its KV is stored and layer l+1's is not computed yet."""
    pre = _engine("hack2")
    seen = []

    def on_layer(kv):
        stores = pre.cache.stores
        this_written = bool(stores[kv.layer]["k_codes"].any())
        next_empty = kv.layer + 1 == len(stores) or not stores[kv.layer + 1]["k_codes"].any()
        seen.append((kv.layer, this_written, next_empty))

    res = pre.prefill_export(PROMPTS[1], SamplingParams(max_tokens=4), "x", on_layer=on_layer)
    assert seen == [(layer, True, True) for layer in range(6)]
    bf16_bytes = res.layers[0].num_tokens * 2 * 2 * 64 * 2  # K+V, 2 heads, d=64, 2 bytes
    assert len(res.layers) == 6 and res.layers[0].nbytes() < bf16_bytes / 3
    pool_whole(pre)


@pytest.mark.parametrize("form", ["host", "device"])
def test_bf16_sends_the_prompts_tokens_not_whole_pages(form):
    """A 37-token prompt sends 37 tokens of K/V per layer (not a 64-token page), 130 sends two
    pages and 2 tokens, 128 two pages; what the decode side rebuilds is the same either way
    (test_disaggregated_equals_single_engine)."""
    pre = _engine("bf16")
    per_token = 2 * 2 * 64 * 4  # K+V, 2 kv heads, d=64, fp32 on the CPU
    for prompt in PROMPTS:
        res = pre.prefill_export(
            prompt, SamplingParams(max_tokens=4), "x", device_form=form == "device"
        )
        for kv in res.layers:
            # payload bytes over the exact K/V bytes: only the pages' small header on top
            extra = kv.nbytes() - len(prompt) * per_token
            assert 0 <= extra < 1024, (len(prompt), kv.nbytes())
    pool_whole(pre)


@pytest.mark.parametrize("form", ["host", "device"])
def test_short_prompts_send_their_sinks_once(form):
    """Before a page is encoded the sink tokens are the open page's first tokens: sent once (the
    receiver takes them from the open page; test_disaggregated_equals_single_engine decodes
    across the page boundary, where they are used)."""
    pre = _engine("hack2")
    for prompt, with_sinks in [(PROMPTS[0], False), (PROMPTS[1], True)]:  # 37, 130 tokens
        res = pre.prefill_export(
            prompt, SamplingParams(max_tokens=4), "x", device_form=form == "device"
        )
        for kv in res.layers:
            names = (
                set(kv.tail) if form == "host" else {e["name"] for e in kv.wire.header["extras"]}
            )
            assert ("sink_k" in names) == with_sinks, (len(prompt), names)
    pool_whole(pre)


def test_abort_of_reservation_and_overload():
    dec = _engine("hack4", num_pages=8)
    params = SamplingParams(max_tokens=10)
    dec.reserve("a", list(range(3, 200)), params)  # 4 pages of 7 usable
    with pytest.raises(Overloaded):
        dec.reserve("b", list(range(3, 300)), params)
    assert dec.abort("a")
    pool_whole(dec)


def test_corrupt_or_mismatched_layer_is_refused():
    params = SamplingParams(max_tokens=5)
    pre, dec = _engine("hack2"), _engine("hack4")
    res = pre.prefill_export(PROMPTS[1], params, "c")
    dec.reserve("c", PROMPTS[1], params)
    with pytest.raises(ValueError, match="hack2"):
        dec.import_layer("c", res.layers[0])
    bad = LayerKV(
        0, res.layers[0].num_tokens, res.layers[0].pages[:-3] + b"xyz", res.layers[0].tail
    )
    same = _engine("hack2")
    same.reserve("c", PROMPTS[1], params)
    with pytest.raises(ValueError, match="checksum"):
        same.import_layer("c", bad)
    dec.abort("c")
    same.abort("c")
    pool_whole(dec)
    pool_whole(same)
