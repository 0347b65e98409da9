"""Prefix caching across prefill and decode engines (engine/disaggregated.py, engine/kv_export.py):
the prefill engine computes only what its cache does not hold, the decode engine reserves the
prompt's leading pages it holds and is sent only the rest (a delta transfer). Over a multi-turn
conversation the delta's output equals a full transfer's (bf16; hack2 with the decode side
keeping codes or dequantized values), the bytes sent drop from the second turn on by what the
decode side held, a malformed delta is refused, and every page returns to its pool."""

from __future__ import annotations

import pytest
import torch
from disagg_helpers import as_received, pool_whole, run_to_completion

from zipserve.compress.wire import LayerKV
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.config import EngineConfig
from zipserve.engine.disaggregated import DisaggregatedEngine
from zipserve.engine.llm import SamplingParams

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
P = 32
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(codec: str, **kw) -> DisaggregatedEngine:
    cfg = EngineConfig(codec=codec, page_size=P, num_pages=96, **kw)
    return DisaggregatedEngine(MODEL, device="cpu", engine_config=cfg)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 8000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _turn(pre, dec, rid: str, prompt: list[int], form: str = "host"):
    """One request through reserve -> prefill (delta) -> import -> admit -> decode; returns
    (output, prefill result, bytes that crossed, pages the decode side held)."""
    held = dec.reserve(rid, prompt, PARAMS)
    res = pre.prefill_export(prompt, PARAMS, rid, device_form=form == "device", first_page=held)
    sent = 0
    for kv in res.layers:
        sent += len(kv.to_bytes()) if form == "host" else kv.nbytes()
        dec.import_layer(rid, as_received(kv, form))
    dec.admit(rid, res.first_token, res.first_logprob)
    out = run_to_completion(dec)[rid]
    dec.release(rid)
    pool_whole(pre)
    pool_whole(dec)
    return out, res, sent, held


@pytest.mark.parametrize(
    "codec,decode_kv",
    [
        ("bf16", "compressed"),
        pytest.param("hack2", "compressed", marks=pytest.mark.slow),  # torch attention on codes
        ("hack2", "dense"),
    ],
)
def test_delta_transfer_equals_full_transfer_over_a_conversation(codec, decode_kv):
    """Two identical prefill engines (so both paths get the same prefill-side KV); one decode
    engine caches (delta), the other does not (every page sent). Each turn's prompt is the
    previous prompt, its answer and new text."""
    pre_full, pre_delta = _engine(codec), _engine(codec)
    dec_full = _engine(codec, decode_kv=decode_kv, prefix_caching=False)
    dec_delta = _engine(codec, decode_kv=decode_kv)
    history, prev = _ids(90, 0), []
    for turn in range(3):
        rid = f"t{turn}"
        full, res_full, sent_full, held_full = _turn(pre_full, dec_full, rid, history)
        delta, res_delta, sent_delta, held = _turn(pre_delta, dec_delta, rid, history)
        assert held_full == 0 and res_full.bytes_not_sent == 0
        assert delta.token_ids == full.token_ids, f"turn {turn}"
        assert res_delta.cached_tokens == res_full.cached_tokens  # the prefill sides agree
        if turn == 0:
            assert held == 0 and sent_delta == sent_full
        else:
            # the decode side holds at least the previous prompt's full pages
            assert held >= (len(prev) // P) and res_delta.bytes_not_sent > 0
            assert sent_delta < sent_full
            # what was left out is what the full transfer sent more (framing aside)
            framing = 512 * len(res_full.layers)
            assert abs(sent_full - sent_delta - res_delta.bytes_not_sent) < framing
            assert res_delta.cached_tokens > 0  # the prefill side reused its own cache too
        prev = history
        history = history + delta.token_ids + _ids(40, turn + 1)
    st = dec_delta.prefix_cache_stats()
    assert st.hits == 2 and st.hit_tokens > 0


def test_prefill_side_computes_only_the_uncached_suffix():
    pre = _engine("hack2")
    computed = []
    inner = pre.runner.prefill

    def counting(seqs, all_logits=False, on_layer_done=None, ends=None):
        computed.append(sum(s.num_tokens - s.num_cached for s in seqs))
        return inner(seqs, all_logits=all_logits, on_layer_done=on_layer_done, ends=ends)

    pre.runner.prefill = counting
    system = _ids(3 * P, 5)
    for i in range(2):
        res = pre.prefill_export(system + _ids(20, 10 + i), PARAMS, f"q{i}")
        assert res.cached_tokens == (0 if i == 0 else 3 * P)
        assert all(kv.num_tokens == 3 * P + 20 for kv in res.layers)  # every page is sent
        pool_whole(pre)
    assert computed == [3 * P + 20, 20]
    st = pre.prefix_cache_stats()
    assert (st.lookups, st.hits, st.hit_tokens) == (2, 1, 3 * P)


@pytest.mark.parametrize("form", ["host", "device"])
def test_full_layers_into_a_reservation_holding_pages(form):
    """A sender that does not know what the receiver holds (a prefill group) sends every page:
    the receiver skips the ones it holds and the output is the same."""
    pre, dec = _engine("bf16"), _engine("bf16")
    prompt = _ids(100, 3)
    first, _, _, _ = _turn(pre, dec, "a", prompt)
    held = dec.reserve("b", prompt, PARAMS)
    assert held == 3
    res = pre.prefill_export(prompt, PARAMS, "b", device_form=form == "device")
    for kv in res.layers:
        assert kv.first_page == 0
        dec.import_layer("b", as_received(kv, form))
    dec.admit("b", res.first_token, res.first_logprob)
    assert run_to_completion(dec)["b"].token_ids == first.token_ids
    dec.release("b")
    pool_whole(dec)


def test_a_delta_missing_pages_is_refused_and_frees_everything():
    pre, dec = _engine("hack2"), _engine("hack2")
    prompt = _ids(100, 4)
    _turn(pre, dec, "a", prompt)
    other = _ids(100, 9)  # nothing of it is cached on the decode side
    assert dec.reserve("b", other, PARAMS) == 0
    res = pre.prefill_export(other, PARAMS, "b", first_page=2)
    with pytest.raises(ValueError, match="holds only 0 cached pages"):
        dec.import_layer("b", LayerKV.from_bytes(res.layers[0].to_bytes()))
    with pytest.raises(ValueError, match="first_page"):
        pre.prefill_export(other, PARAMS, "c", first_page=4)  # 100 tokens: 3 full pages
    dec.abort("b")
    dec.release("b")
    pool_whole(pre)
    pool_whole(dec)


def test_wrong_page_count_is_refused():
    pre, dec = _engine("bf16"), _engine("bf16")
    prompt = _ids(100, 6)
    dec.reserve("a", prompt, PARAMS)
    res = pre.prefill_export(prompt[:70], PARAMS, "a")  # 2 full pages for a 3-page prompt
    kv = res.layers[0]
    kv.num_tokens = len(prompt)
    with pytest.raises(ValueError, match="pages 0..2 arrived for a sequence of 3 full pages"):
        dec.import_layer("a", LayerKV.from_bytes(kv.to_bytes()))
    dec.abort("a")
    dec.release("a")
    pool_whole(pre)
    pool_whole(dec)


@pytest.mark.parametrize(
    "codec,decode_kv",
    [
        ("bf16", "compressed"),
        ("hack2", "dense"),
        pytest.param("hack2", "compressed", marks=pytest.mark.slow),
    ],
)
def test_local_prefill_of_the_rest_equals_receiving_it(codec, decode_kv):
    """Turn 2 of a conversation: one decode engine is sent the pages it lacks, the other
    computes them itself after its cached pages (prefill_reserved). Same greedy tokens; the
    local one computed only the rest."""
    engines = {}
    for name in ("sent", "local"):
        pre, dec = _engine(codec), _engine(codec, decode_kv=decode_kv)
        first, _, _, _ = _turn(pre, dec, "t0", _ids(100, 7))
        engines[name] = (pre, dec, first)
    assert engines["sent"][2].token_ids == engines["local"][2].token_ids
    history = _ids(100, 7) + engines["sent"][2].token_ids + _ids(30, 8)
    sent, _, _, held_sent = _turn(*engines["sent"][:2], "t1", history)
    _, dec, _ = engines["local"]
    computed = []
    inner = dec.runner.prefill

    def counting(seqs, all_logits=False, on_layer_done=None, ends=None):
        computed.append(sum(s.num_tokens - s.num_cached for s in seqs))
        return inner(seqs, all_logits=all_logits, on_layer_done=on_layer_done, ends=ends)

    dec.runner.prefill = counting
    held = dec.reserve("t1", history, PARAMS)
    assert held == held_sent > 0
    dec.prefill_reserved("t1")
    local = run_to_completion(dec)["t1"]
    assert computed == [len(history) - held * P]
    assert local.token_ids == sent.token_ids and local.cached_tokens == held * P
    dec.release("t1")
    pool_whole(dec)
    with pytest.raises(KeyError, match="holds no reservation"):
        dec.prefill_reserved("t1")
