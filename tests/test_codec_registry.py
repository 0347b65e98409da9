"""A new codec is one class and one registry entry: a toy codec defined here (int8 pages, one scale
per page and KV head) runs the engine end to end on the CPU, prefilled on one engine and decoded
on another through the wire, with nothing else in zipserve naming it; the registry refuses names
it does not know, naming those it knows."""

from __future__ import annotations

import pytest
import torch
from disagg_helpers import hand_over, pool_whole, run_to_completion

from zipserve.compress.codec import KVCodec
from zipserve.compress.codecs import (
    CODECS,
    CodecEntry,
    codec_entry,
    codec_names,
    make_codec,
    register,
    unregister,
)
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.config import ConfigError, EngineConfig
from zipserve.engine.disaggregated import DisaggregatedEngine
from zipserve.engine.llm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
NAME = "int8page-test"
PROMPTS = [list(range(3, 40)), list(range(100, 230))]  # 37 tokens (no full page), 130 (two)
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


class Int8PageCodec(KVCodec):
    """Symmetric int8 codes, one fp32 scale per page and KV head for K and for V."""

    name = NAME

    def new_store(self, num_pages, device):
        codes = (num_pages, self.kvh, self.page_size, self.head_dim)  # [pages, KVH, P, D]
        return {
            "k": torch.zeros(codes, dtype=torch.int8, device=device),
            "v": torch.zeros(codes, dtype=torch.int8, device=device),
            "k_scale": torch.ones(num_pages, self.kvh, device=device),  # [pages, KVH]
            "v_scale": torch.ones(num_pages, self.kvh, device=device),
        }

    def encode(self, store, page_ids, k, v):
        for name, x in (("k", k), ("v", v)):  # x [n, KVH, P, D]
            amax = x.float().abs().amax(dim=(2, 3)).clamp(min=1e-8)  # [n, KVH]
            scale = amax / 127
            store[name][page_ids] = (x.float() / scale[:, :, None, None]).round().to(torch.int8)
            store[name + "_scale"][page_ids] = scale

    def dequantize(self, store, page_ids):
        return tuple(
            store[n][page_ids].float() * store[n + "_scale"][page_ids][:, :, None, None]
            for n in ("k", "v")
        )

    def page_bytes_per_token(self):
        return 2 * self.head_dim + 2 * 4 / self.page_size


@pytest.fixture
def int8page():
    entry = register(CodecEntry(NAME, Int8PageCodec))
    try:
        yield entry
    finally:
        unregister(NAME)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("decode_kv", ["compressed", "dense"])
def test_a_registered_codec_serves_end_to_end(int8page, decode_kv):
    assert NAME in codec_names() and NAME not in CODECS
    ref = LLM(MODEL, device="cpu")
    llm = LLM(MODEL, device="cpu", codec=NAME, decode_kv=decode_kv)
    assert isinstance(llm.engine.codec, Int8PageCodec) and llm.engine.decode_kv == decode_kv
    ids = PROMPTS[1]
    assert _rel(llm.logits(ids), ref.logits(ids)) < 0.05  # scored page by page over int8 pages
    outs = llm.generate(PROMPTS, GREEDY)
    want = ref.generate(PROMPTS, GREEDY)
    assert [len(o.token_ids) for o in outs] == [GREEDY.max_tokens] * len(PROMPTS)
    # int8 pages are close to exact: the greedy paths agree for a good while
    assert all(o.token_ids[:8] == w.token_ids[:8] for o, w in zip(outs, want))
    assert llm.engine.pool.num_free == llm.engine.pool.capacity


@pytest.mark.parametrize("form", ["host", "device"])
def test_a_registered_codec_crosses_the_wire(int8page, form):
    """Prefill on one engine, decode on another: the toy codec's pages travel in the wire form
    (host bytes or a device buffer) and decode to what one engine does alone."""
    want = [o.token_ids for o in LLM(MODEL, device="cpu", codec=NAME).generate(PROMPTS, GREEDY)]
    pre, dec = (
        DisaggregatedEngine(MODEL, device="cpu", engine_config=EngineConfig(codec=NAME))
        for _ in range(2)
    )
    hand_over(pre, [dec], PROMPTS, GREEDY, form)
    got = run_to_completion(dec)
    assert [got[f"r{i}"].token_ids for i in range(len(PROMPTS))] == want
    pool_whole(pre)
    pool_whole(dec)


def test_unknown_names_are_refused_naming_the_known_ones(int8page):
    for bad in ("int9", "", "BF16"):
        with pytest.raises(
            ValueError,
            match=r"codec: unknown codec .*; known: bf16, fp8, "
            r"kivi2, .*lowrank\+hack2mix, " + NAME,
        ) as e:
            codec_entry(bad)
        assert repr(bad) in str(e.value)
        with pytest.raises(ValueError, match="unknown codec"):
            make_codec(bad, 2, 64, 64)
        with pytest.raises(ConfigError, match=rf"^codec: unknown codec {bad!r}; known: "):
            EngineConfig(codec=bad)
    unregister(NAME)
    with pytest.raises(ConfigError, match="unknown codec"):  # gone once unregistered
        EngineConfig(codec=NAME)
    with pytest.raises(ValueError, match="already registered"):
        register(CodecEntry("bf16", Int8PageCodec))


def test_the_registry_says_what_each_codec_needs():
    """Capabilities come from the classes, calibration and kernels from the entries."""
    assert codec_entry("bf16").codec_class.dense_pages
    assert not any(codec_entry(c).codec_class.dense_pages for c in CODECS if c != "bf16")
    # every shipped codec can be decoded dense (lowrank: K at full dimension, V in its basis)
    assert all(codec_entry(c).codec_class.dense_form for c in CODECS)
    assert codec_entry("hack2mix").calibration == "kvbits.json"
    assert codec_entry("lowrank+hack2").calibration == "lowrank.safetensors"
    assert codec_entry("lowrank+hack2mix").calibration == "lowrank.safetensors"  # + its plan
    assert codec_entry("hack2mix").kernels == ("hack2", "hack4")
    assert codec_entry("fp8").kernels == ("fp8",) and codec_entry("fp8").calibration is None
    dense = make_codec("bf16", 2, 64, 64, dtype=torch.float32)
    assert dense.name == "bf16" and dense.new_store(3, "cpu")["k"].dtype == torch.float32
