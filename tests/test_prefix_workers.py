"""Prefix caching in the workers (prefill_worker/, decode_worker/) over an in-process channel: a
decode worker's reservation says which leading pages it holds, the prefill worker sends only the
rest; over a conversation the tokens equal those of a pair whose decode worker caches nothing,
the bytes on the channel drop from the second turn on, the workers report their caches, and
every page returns to its pool."""

from __future__ import annotations

import time

import pytest
import torch

from zipserve.control.messages import Reservation
from zipserve.decode_worker.worker import DecodeWorker
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.llm import SamplingParams
from zipserve.prefill_worker.worker import PrefillWorker
from zipserve.transfer.inprocess import InProcessChannel

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
P = 32
PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def _pair(codec: str, decode_caching: bool):
    a, b = InProcessChannel.pair()
    opts = {"page_size": P}
    pre = PrefillWorker(MODEL, codec, "cpu", engine_options=opts)
    dec = DecodeWorker(
        MODEL, codec, "cpu", engine_options={**opts, "prefix_caching": decode_caching}
    )
    pre.attach("d0", a)
    dec.attach("p0", b)
    return pre, dec


def _serve(pre, dec, rid, prompt):
    held = dec.reserve(rid, prompt, PARAMS)
    assert isinstance(held, Reservation) and held.page_size == P
    rep = pre.prefill(rid, prompt, PARAMS, "d0", held.held_pages)
    res = dec.admit(rid, rep.first_token, rep.first_logprob, timeout=10)
    while not res.finished:
        res = dec.poll(rid, 0, timeout=5)
    dec.release(rid)
    return held, rep, res


def _whole(pre, dec):
    s = dec.stats()
    assert s.free_pages == s.capacity_pages and s.used_pages == 0
    assert s.reserved == 0 and s.running == 0
    p = pre.stats()
    assert p.free_pages == p.capacity_pages and p.used_pages == 0


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 8000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_conversation_sends_only_the_pages_the_decode_worker_lacks(codec):
    pairs = {name: _pair(codec, name == "delta") for name in ("full", "delta")}
    history = _ids(80, 1)
    sent: dict[str, list[int]] = {"full": [], "delta": []}
    try:
        for turn in range(3):
            got = {}
            for name, (pre, dec) in pairs.items():
                held, rep, res = _serve(pre, dec, f"t{turn}", history)
                assert res.finish_reason == "length"
                got[name] = res.tokens
                sent[name].append(rep.bytes_sent)
                if name == "full":
                    assert held.held_pages == 0 and rep.bytes_not_sent == 0
                elif turn:
                    assert held.held_pages >= 1 and rep.first_page == held.held_pages
                    assert rep.bytes_not_sent > 0 and rep.cached_tokens > 0
                _whole(pre, dec)
            assert got["delta"] == got["full"], f"turn {turn}"
            history = history + got["delta"] + _ids(30, 10 + turn)
        assert sent["delta"][0] == sent["full"][0]
        assert all(d < f for d, f in zip(sent["delta"][1:], sent["full"][1:])), sent
        st = pairs["delta"][1].stats()
        assert st.cached_pages > 0 and 0 < st.cache_hit_tokens < st.cache_lookup_tokens
        assert pairs["full"][1].stats().cache_lookup_tokens == 0  # caching off: never asked
        assert pairs["full"][0].stats().cache_hit_tokens > 0  # its prefill worker reused pages
    finally:
        for _, dec in pairs.values():
            dec.shutdown()


def test_cached_prefix_pages_answers_without_taking_anything():
    pre, dec = _pair("bf16", True)
    try:
        prompt = _ids(100, 2)
        assert dec.cached_prefix_pages(prompt) == 0
        _serve(pre, dec, "a", prompt)
        assert dec.cached_prefix_pages(prompt) == 3
        assert dec.cached_prefix_pages(prompt[:40] + _ids(60, 3)) == 1
        assert dec.cached_prefix_pages(_ids(100, 4)) == 0
        _whole(pre, dec)
    finally:
        dec.shutdown()


@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_decode_worker_prefills_a_short_rest_itself(codec):
    """Turn 2 on two pairs: one sends the pages the decode worker lacks, the other's decode
    worker computes them (prefill_local): same tokens, its prefill worker never ran for it."""
    pairs = {name: _pair(codec, True) for name in ("sent", "local")}
    try:
        prompt = _ids(80, 5)
        answers = [_serve(pre, dec, "t0", prompt)[2].tokens for pre, dec in pairs.values()]
        assert answers[0] == answers[1]
        history = prompt + answers[0] + _ids(10, 6)
        _, _, sent = _serve(*pairs["sent"], "t1", history)
        pre, dec = pairs["local"]
        before = pre.stats().prefills
        held = dec.reserve("t1", history, PARAMS)
        assert 0 < len(history) - held.held_tokens <= 64
        res = dec.prefill_local("t1", timeout=30)
        assert res.tokens and {"local_prefill", "first_token"} <= set(res.times)
        while not res.finished:
            res = dec.poll("t1", 0, timeout=5)
        assert res.tokens == sent.tokens and res.finish_reason == "length"
        assert pre.stats().prefills == before
        dec.release("t1")
        _whole(pre, dec)
        # an aborted reservation is not prefilled: the reply says it ended
        dec.reserve("t2", history, PARAMS)
        dec.abort("t2")
        time.sleep(0.1)  # the step loop applies aborts
        assert dec.prefill_local("t2", timeout=5).finish_reason == "abort"
        dec.release("t2")
        _whole(pre, dec)
    finally:
        for _, d in pairs.values():
            d.shutdown()
