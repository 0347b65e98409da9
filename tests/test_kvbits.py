"""hack2mix (compress/kvbits.py): HACK with per-layer bits from kvbits.json. Its layers have the
planned bits and behave exactly as plain hack2/hack4 layers through the engine and the wire; a
missing or invalid plan is a clear error; calibration upgrades the layers whose measured gain is
largest, within the byte budget."""

from __future__ import annotations

import json
import math

import pytest
from disagg_helpers import hand_over, pool_whole, run_to_completion

from zipserve.compress.codecs import HackCodec, make_codec
from zipserve.compress.kvbits import (
    KVBITS_FILE,
    HackMixedCodec,
    KVBitsError,
    calibrate_kvbits,
    load_bits,
    plan_bits,
)
from zipserve.compress.wire import WireError, unpack_pages
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.config import EngineConfig
from zipserve.engine.decode_kv import DeviceInfo, check_decode_kv, choose_decode_kv
from zipserve.engine.disaggregated import DisaggregatedEngine
from zipserve.engine.llm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
PROMPTS = [list(range(100, 230)), list(range(3, 40))]  # 2 full pages + 2 open; open page only
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)


def _model_with(tmp_path, bits=None, text=None):
    """The reference model's files linked into tmp_path, with its own kvbits.json."""
    for f in REFERENCE_MODEL.iterdir():
        if f.name != KVBITS_FILE:
            (tmp_path / f.name).symlink_to(f.resolve())
    if bits is not None:
        text = json.dumps({"bits": bits})
    if text is not None:
        (tmp_path / KVBITS_FILE).write_text(text)
    return str(tmp_path)


def _engine(codec: str, model: str = MODEL, **kw) -> DisaggregatedEngine:
    return DisaggregatedEngine(model, device="cpu", engine_config=EngineConfig(codec=codec, **kw))


def test_layers_have_the_planned_bits_and_bytes():
    bits = json.loads((REFERENCE_MODEL / KVBITS_FILE).read_text())["bits"]
    assert bits == load_bits(MODEL) and len(bits) == 6
    c = make_codec("hack2mix", 2, 64, 64, model_dir=MODEL)
    assert isinstance(c, HackMixedCodec) and c.name == "hack2mix" and c.n_sink == 4
    for i, b in enumerate(bits):
        layer = c.for_layer(i)
        assert type(layer) is HackCodec and layer.bits == b and layer.name == f"hack{b}"
    per = {b: 2 * HackCodec(2, 64, 64, b).page_bytes_per_token() for b in (2, 4)}
    assert c.bytes_per_token(6) == sum(per[b] for b in bits)
    with pytest.raises(TypeError, match="for_layer"):
        c.new_store(1, "cpu")
    llm = LLM(MODEL, device="cpu", codec="hack2mix")
    assert [x.name for x in llm.engine.cache.codecs] == [f"hack{b}" for b in bits]
    assert llm.engine.cache.bytes_per_page(c, llm.engine.config, 64) == round(
        64 * sum(per[b] for b in bits)
    )


@pytest.mark.parametrize("uniform", [2, 4])
def test_uniform_plan_is_plain_hack(tmp_path, uniform):
    """A plan of one bit width decodes exactly as hack2 / hack4 (compressed and dense)."""
    model = _model_with(tmp_path, [uniform] * 6)
    for mode in ("compressed", "dense"):
        want = LLM(MODEL, device="cpu", codec=f"hack{uniform}", decode_kv=mode).generate(
            PROMPTS, PARAMS
        )
        got = LLM(model, device="cpu", codec="hack2mix", decode_kv=mode).generate(PROMPTS, PARAMS)
        for w, g in zip(want, got):
            assert g.token_ids == w.token_ids and g.logprobs == w.logprobs


def test_wire_pages_are_each_layers_own_codec():
    """Each layer's pages equal the plain hack2 / hack4 engine's for that layer, under its name;
    the wire bytes are the sum of the layers' bytes."""
    bits = load_bits(MODEL)
    prompt = list(range(100, 300))  # 3 full pages; one prefill chunk: every layer's KV is exact
    outs = {}
    for codec in ("hack2mix", "hack2", "hack4"):
        eng = _engine(codec)
        outs[codec] = eng.prefill_export(prompt, PARAMS, "r").layers
        pool_whole(eng)
    total = 0
    for i, b in enumerate(bits):
        got, want = unpack_pages(outs["hack2mix"][i].pages), unpack_pages(outs[f"hack{b}"][i].pages)
        assert got.codec == f"hack{b}" and got.num_pages == 3
        for name, t in want.tensors.items():
            assert got.tensors[name].equal(t)
        total += sum(t.numel() * t.element_size() for t in got.tensors.values())
    c = make_codec("hack2mix", 2, 64, 64, model_dir=MODEL)
    assert total == 3 * 64 * c.bytes_per_token(6)


@pytest.mark.parametrize("form", ["host", "device"])
@pytest.mark.parametrize("mode", ["compressed", "dense"])
def test_disaggregated_transfer(mode, form):
    """prefill worker -> decode worker (host and device wire forms): equals one engine; every
    page comes back."""
    want = LLM(MODEL, device="cpu", codec="hack2mix", decode_kv=mode).generate(PROMPTS, PARAMS)
    pre, dec = _engine("hack2mix"), _engine("hack2mix", decode_kv=mode)
    hand_over(pre, [dec], PROMPTS, PARAMS, form=form)
    done = run_to_completion(dec)
    assert [done[f"r{i}"].token_ids for i in range(len(PROMPTS))] == [w.token_ids for w in want]
    pool_whole(pre)
    pool_whole(dec)


def test_a_hack2_receiver_refuses_the_4bit_layers():
    bits = load_bits(MODEL)
    four = bits.index(4)
    pre, dec = _engine("hack2mix"), _engine("hack2")
    res = pre.prefill_export(PROMPTS[0], PARAMS, "c")
    dec.reserve("c", PROMPTS[0], PARAMS)
    dec.import_layer("c", res.layers[bits.index(2)])  # a 2-bit layer is hack2's
    with pytest.raises(WireError, match="'hack4'.*'hack2'"):
        dec.import_layer("c", res.layers[four])
    dec.abort("c")
    pool_whole(pre)
    pool_whole(dec)


def test_missing_or_invalid_plan_is_a_clear_error(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(KVBitsError, match=r"kvbits\.json.*zipserve calibrate --kvbits"):
        LLM(_model_with(bare), device="cpu", codec="hack2mix")
    for i, text in enumerate(
        [
            "{not json",
            json.dumps({"bits": [2, 3, 2, 2, 2, 2]}),
            json.dumps({"layers": [5]}),
            json.dumps({"bits": []}),
        ]
    ):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        with pytest.raises(KVBitsError, match=r"kvbits\.json.*calibrate --kvbits"):
            make_codec("hack2mix", 2, 64, 64, model_dir=_model_with(d, text=text))
    short = tmp_path / "short"
    short.mkdir()
    with pytest.raises(KVBitsError, match="plans 3 layers"):
        LLM(_model_with(short, [2, 2, 4]), device="cpu", codec="hack2mix")
    with pytest.raises(KVBitsError, match="model directory"):
        make_codec("hack2mix", 2, 64, 64)
    assert load_bits("random:tiny")[-1] == 4  # random weights: a stand-in plan for speed runs


def test_decode_kv_choice_as_hack2():
    check_decode_kv("hack2mix", "dense")
    h100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 1 << 40)
    for codec in ("hack2", "hack2mix"):  # both compressed where hack2's and hack4's steps win
        assert choose_decode_kv(codec, h100, 1).mode == "compressed"
        assert choose_decode_kv(codec, h100, 1 << 41).mode == "compressed"  # dense won't fit
        assert choose_decode_kv(codec, DeviceInfo("cpu"), 0).mode == "dense"
    h200 = DeviceInfo("cuda", "NVIDIA H200", 1 << 40)
    assert "1.13x" in choose_decode_kv("hack2mix", h200, 1).reason  # the slower of hack2/hack4


def test_plan_is_greedy_within_budget():
    b = {2: 100.0, 4: 164.0}
    bits, _ = plan_bits([0.01, 0.5, 0.0, 0.2, 0.3, 0.02], b, 6, 6 * 100 + 2 * 64, 0.005)
    assert bits == [2, 4, 2, 2, 4, 2]  # the two largest gains; a third would pass the budget
    bits, _ = plan_bits([0.01, 0.5, 0.0, 0.2, 0.3, 0.02], b, 6, 10_000, 0.25)
    assert bits == [2, 4, 2, 2, 4, 2]  # the gain stops at 0.2 < 0.25
    with pytest.raises(ValueError, match="budget"):
        plan_bits([0.1] * 6, b, 6, 500, 0.0)


def test_calibration_picks_the_top_gain_layers(tmp_path):
    """Measured on the training split (1 small window here): the plan is the greedy one over the
    measured gains, and on the reference model it keeps layer 5 in 4 bits."""
    info = calibrate_kvbits(
        MODEL, out_dir=tmp_path, n_windows=1, context=512, score=256, progress=False
    )
    written = json.loads((tmp_path / KVBITS_FILE).read_text())
    assert written["bits"] == info["bits"] and len(info["sensitivity"]) == 6
    gains = [r["gain"] for r in info["sensitivity"]]
    c2, c4 = (2 * HackCodec(2, 64, 64, b).page_bytes_per_token() for b in (2, 4))
    want, _ = plan_bits(
        gains, {2: c2, 4: c4}, 6, 0.25 * info["bf16_bytes_per_token"], math.log1p(0.005)
    )
    assert info["bits"] == want
    chosen = info["layers_4bit"]
    assert set(chosen) == set(sorted(range(6), key=lambda i: -gains[i])[: len(chosen)])
    assert 5 in chosen and info["ratio_vs_bf16"] <= 0.25
