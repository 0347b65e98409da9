"""bench/quality_breakdown.py's core on the reference model, a few hundred tokens (CPU, seconds):
nothing quantized is the bf16 model, everything quantized is the codec as the engine runs it, and
a subset lies between."""

import math

import pytest
import torch

from zipserve.bench import quality_breakdown as qb
from zipserve.train.corpus import stdlib_dir

CONTEXT, SCORE = 192, 96  # 3 pages of 64; the last 96 tokens read 1-2 encoded pages


@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(1)
    config, net, tok = qb.load()
    text = (stdlib_dir() / "textwrap.py").read_text()  # a held-out file (train/corpus.py)
    ids = tok.encode(text)
    wins = [ids[:CONTEXT], ids[CONTEXT : 2 * CONTEXT]]
    return qb.Setup(net, config, "hack2"), wins


def _ppl(setup, wins, v):
    total, n = qb.nll(setup, wins, v, SCORE)
    return math.exp(total / n)


def test_nothing_quantized_is_bf16(ref):
    setup, wins = ref
    from zipserve.engine.llm import LLM

    llm = LLM(
        qb.DEFAULT_MODEL, device="cpu", dtype="float32", num_pages=16, max_model_len=CONTEXT + 1
    )
    total = 0.0
    for ids in wins:
        logp = torch.log_softmax(llm.logits(ids), -1)
        total -= (
            logp[
                torch.arange(CONTEXT - SCORE - 1, CONTEXT - 1), torch.tensor(ids[CONTEXT - SCORE :])
            ]
            .sum()
            .item()
        )
    engine_bf16 = math.exp(total / (SCORE * len(wins)))
    none = _ppl(setup, wins, qb.Variant("none", quantize=False))
    assert none == pytest.approx(engine_bf16, rel=1e-5)
    # An empty subset takes the quantized code path and must change nothing at all.
    assert _ppl(setup, wins, qb.Variant("no heads", heads=())) == none


def test_all_above_subset_above_none(ref):
    """The subset masks: quantizing layer 5's K alone lands between nothing and everything. On
    these 192 scored tokens the ordering is checked with min/max hack2 (clip=0): with the range
    clip, everything quantized scores below layer 5's K alone here (26.84 vs 27.01, a sample this
    small; on the whole held-out split everything costs +5.9%, QUALITY_BREAKDOWN.md)."""
    from zipserve.compress.hack import HackCodec

    ref_setup, wins = ref
    setup = qb.Setup(ref_setup.net, ref_setup.config, "hack2")
    c = setup.config
    setup.codecs["hack2"] = HackCodec(c.num_kv_heads, setup.page_size, c.head_dim, 2, clip=0)
    none = _ppl(setup, wins, qb.Variant("none", quantize=False))
    full = _ppl(setup, wins, qb.Variant("all"))
    subset = _ppl(setup, wins, qb.Variant("layer 5 K", layers=(5,), v=False))
    assert none < subset < full


def test_matches_engine_codec_and_bytes(ref):
    setup, wins = ref
    from zipserve.engine.llm import LLM

    llm = LLM(
        qb.DEFAULT_MODEL,
        device="cpu",
        dtype="float32",
        codec="hack2",
        num_pages=16,
        max_model_len=CONTEXT + 1,
    )
    ids = wins[0]
    rows = torch.arange(CONTEXT - SCORE - 1, CONTEXT - 1)
    tgt = torch.tensor(ids[CONTEXT - SCORE :])
    mine = -torch.log_softmax(qb.forward(setup, ids, qb.Variant("all")), -1)[rows, tgt].mean()
    eng = -torch.log_softmax(llm.logits(ids), -1)[rows, tgt].mean()
    assert mine.item() == pytest.approx(eng.item(), abs=2e-3)
    assert qb.variant_bytes(setup, qb.Variant("all"), 1024) == pytest.approx(
        llm.engine.codec.bytes_per_token(setup.config.num_layers)
    )
    assert qb.variant_bytes(setup, qb.Variant("none", quantize=False), 1024) == 3072


@pytest.mark.parametrize("codec", ["lowrank", "lowrank+hack2", "hack2mix"])
def test_per_layer_codecs_match_the_engine(ref, codec):
    """Codecs with one codec per layer (calibrated ranks, per-layer bits): the tool's forward
    scores as the engine does (lowrank: pages' values lifted back from V's completed basis, the
    16-bit tail exact), and its bytes are the engine's."""
    setup, wins = ref
    from zipserve.engine.llm import LLM

    mine_setup = qb.Setup(setup.net, setup.config, codec, model_dir=qb.DEFAULT_MODEL)
    llm = LLM(
        qb.DEFAULT_MODEL,
        device="cpu",
        dtype="float32",
        codec=codec,
        num_pages=16,
        max_model_len=CONTEXT + 1,
    )
    ids = wins[1]
    rows = torch.arange(CONTEXT - SCORE - 1, CONTEXT - 1)
    tgt = torch.tensor(ids[CONTEXT - SCORE :])
    mine = -torch.log_softmax(qb.forward(mine_setup, ids, qb.Variant("all")), -1)[rows, tgt].mean()
    eng = -torch.log_softmax(llm.logits(ids), -1)[rows, tgt].mean()
    assert mine.item() == pytest.approx(eng.item(), abs=2e-3)
    none = _ppl(mine_setup, wins, qb.Variant("none", quantize=False))
    assert _ppl(mine_setup, wins, qb.Variant("all")) != none  # the codec acts (either way)
    assert qb.variant_bytes(mine_setup, qb.Variant("all"), 1024) == pytest.approx(
        llm.engine.codec.bytes_per_token(setup.config.num_layers)
    )


def test_kivi_with_smaller_groups_costs_more_and_errs_less():
    """bench/kivi_equal_bytes.py's KIVI of other group sizes: the bytes follow the groups
    (K scale + min per channel per token group, V per token per channel group) and smaller
    groups reconstruct random K/V at least as well as kivi2's groups of 32."""
    from zipserve.bench.kivi_equal_bytes import KiviGroups
    from zipserve.compress.kivi import KiviCodec

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 64, 64, generator=g), torch.randn(3, 2, 64, 64, generator=g)
    ids = torch.arange(3)
    errs = []
    for codec, side in (
        (KiviCodec(2, 64, 64, 2), 8 + 8),
        (KiviGroups(2, 64, 64, 2, 16, 32), 16 + 8),
        (KiviGroups(2, 64, 64, 2, 16, 16), 16 + 16),
    ):
        assert codec.page_bytes_per_token() == 2 * 64 * 2 / 8 + side
        store = codec.new_store(3, "cpu")
        codec.encode(store, ids, k, v)
        dk, dv = codec.dequantize(store, ids)
        errs.append(((dk - k).pow(2).mean().item(), (dv - v).pow(2).mean().item()))
    assert errs[1][0] < errs[0][0] and errs[2][1] < errs[1][1]


def test_equal_bytes_clip_applies_to_both_codecs():
    """bench/kivi_equal_bytes.py --clip: HACK and KIVI codecs of the run clip their 2-bit groups
    alike (4-bit groups keep min/max); clip 0 is the min/max rule of both."""
    from types import SimpleNamespace

    from zipserve.bench.kivi_equal_bytes import clipped_codecs

    cfg = SimpleNamespace(num_kv_heads=2, head_dim=64)
    for clip in (0.0, 0.1):
        cs = clipped_codecs(qb.DEFAULT_MODEL, clip)(cfg, 64)
        for name in ("kivi2", "hack2", "kivi2-k16", "kivi2-k16v16"):
            assert cs[name].clip == clip, name
        assert cs["kivi4"].clip == cs["hack4"].clip == 0.0
        mix = cs["hack2mix"]
        assert [c.clip for c in mix.layers] == [clip if b == 2 else 0.0 for b in mix.bits]
        assert 4 in mix.bits and 2 in mix.bits
