"""Codecs end to end through the engine on the reference model (CPU): decode on compressed pages
equals page-by-page scoring, bf16 equals the engine without codecs, pages and slots come back,
byte accounting is exact, and quantization error is bounded."""

from __future__ import annotations

import pytest
import torch

from zipserve.compress.codecs import CODECS, make_codec
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.llm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
COMPRESSED = [c for c in CODECS if c != "bf16"]


def _codec(name: str):
    """One layer's codec at the reference model's KV geometry (2 KV heads, head_dim 64)."""
    return make_codec(name, num_kv_heads=2, page_size=64, head_dim=64, model_dir=MODEL).for_layer(1)


def _whole(llm):
    eng = llm.engine
    assert eng.pool.num_free == eng.pool.capacity, eng.pool.owners()
    assert len(eng.scheduler.free_slots) == eng.engine_config.max_num_seqs


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 8000, (n,), generator=g).tolist()


def test_bf16_codec_is_the_plain_engine():
    prompts = [_prompt(30, 1), _prompt(90, 2)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=0)
    plain = LLM(MODEL, device="cpu").generate(prompts, params)
    coded = LLM(MODEL, device="cpu", codec="bf16").generate(prompts, params)
    assert [o.token_ids for o in plain] == [o.token_ids for o in coded]
    # Same code path; logprobs agree to float rounding (CPU BLAS may pick another thread count
    # between runs under load, which reorders sums).
    for a, b in zip(plain, coded):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("codec", COMPRESSED)
def test_decode_on_compressed_pages_equals_scoring(codec):
    """A prompt shorter than a page, then 150 generated tokens (two pages sealed during decode):
    every decode step's logprob equals scoring the final sequence page by page."""
    llm = LLM(MODEL, device="cpu", codec=codec)
    prompt = _prompt(40, 3)
    out = llm.generate(
        prompt, SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True, logprobs=0)
    )[0]
    full = torch.log_softmax(llm.logits(prompt + out.token_ids), dim=-1)
    expect = [full[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expect, abs=2e-3)
    _whole(llm)


@pytest.mark.parametrize("codec", ["hack2", "kivi2", "fp8"])
def test_batched_aborts_and_preemption_free_everything(codec):
    llm = LLM(MODEL, device="cpu", codec=codec, num_pages=12, max_num_seqs=4)
    eng = llm.engine
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request(_prompt(n, 10 + n), params) for n in (5, 70, 130, 20, 64)]
    for _ in range(30):
        eng.step()
    eng.abort(ids[1])
    while eng.has_unfinished():
        eng.step()
    for i in ids:
        eng.release(i)
    _whole(llm)


@pytest.mark.parametrize("codec", COMPRESSED)
def test_store_bytes_match_stated_bytes(codec):
    c = _codec(codec)
    store = c.new_store(10, "cpu")
    per_token = c.store_nbytes(store) / (10 * 2 * 64)
    assert per_token == pytest.approx(c.page_bytes_per_token(), rel=1e-9)
    assert per_token < 2 * 2 * 64  # fewer bytes than bf16 K+V


@pytest.mark.parametrize("codec", ["fp8", "kivi4", "hack4", "kivi2", "hack2"])
def test_round_trip_error_is_bounded(codec):
    c = _codec(codec)
    store = c.new_store(4, "cpu")
    g = torch.Generator().manual_seed(7)
    k = torch.randn(3, 2, 64, 64, generator=g)
    v = torch.randn(3, 2, 64, 64, generator=g)
    ids = torch.tensor([3, 1, 2])
    c.encode(store, ids, k, v)
    dk, dv = c.dequantize(store, ids)
    bits = {"fp8": 5, "kivi4": 4, "hack4": 4, "kivi2": 2, "hack2": 2}[codec]
    bound = 8.0 / (2**bits - 1)  # half a quantization step of an ~8-sigma range, with slack
    for x, y in ((k, dk), (v, dv)):
        assert (x - y).abs().max().item() < bound
        assert (x - y).pow(2).mean().sqrt().item() < bound / 2


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="codec"):
        LLM(MODEL, device="cpu", codec="zip9")
