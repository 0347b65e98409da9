"""Measured low-rank plans (compress/lowrank_plan.py): the budgeted choice is the exact optimum of
the measured losses, ranks and widths follow where the loss is, lowrank+hack2mix builds and moves
its planned layers through the engine and the wire, and a missing or invalid plan is a clear
error."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from disagg_helpers import hand_over, pool_whole, run_to_completion

from zipserve.compress.codecs import make_codec
from zipserve.compress.hack import HackCodec
from zipserve.compress.lowrank import LowRankLayerCodec
from zipserve.compress.lowrank_bases import LowRankBases
from zipserve.compress.lowrank_plan import (
    MIX_NAME,
    PLAN_FILE,
    LowRankPlanError,
    Option,
    allocate_ranks_measured,
    choose,
    hack_layer_bytes,
    hack_option_losses,
    hack_widths,
    load_hack_plan,
    monotone,
    plan_hack,
    rank_losses,
)
from zipserve.compress.wire import unpack_pages
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.config import EngineConfig
from zipserve.engine.disaggregated import DisaggregatedEngine
from zipserve.engine.llm import LLM, SamplingParams

HAVE_REF = (REFERENCE_MODEL / "config.json").exists()
MODEL = str(REFERENCE_MODEL)
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)


# -- the budgeted choice ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_choose_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    items = [
        [Option(rng.randint(1, 6), rng.random()) for _ in range(rng.randint(1, 4))]
        for _ in range(rng.randint(1, 5))
    ]
    budget = rng.randint(sum(min(o.cost for o in it) for it in items), 20)
    picks, loss = choose(items, budget)
    assert sum(items[i][p].cost for i, p in enumerate(picks)) <= budget
    assert loss == pytest.approx(sum(items[i][p].loss for i, p in enumerate(picks)))
    best = min(
        sum(o.loss for o in combo)
        for combo in itertools.product(*items)
        if sum(o.cost for o in combo) <= budget
    )
    assert loss == pytest.approx(best)
    with pytest.raises(ValueError, match="budget"):
        choose(items, sum(min(o.cost for o in it) for it in items) - 1)


def test_monotone_losses_never_rise_with_rank_and_are_not_negative():
    got = monotone({8: 0.5, 16: 0.1, 24: 0.2, 32: -0.01})
    assert got == {8: 0.5, 16: 0.2, 24: 0.2, 32: 0.0}


def _synthetic_rank_losses(num_layers, d, step, hard):
    """Every (layer, kind) loses 0.01 per missing step of rank; `hard` loses 1.0 per step."""
    return {
        (layer, kind, r): (1.0 if (layer, kind) == hard else 0.01) * (d - r) / step
        for layer in range(num_layers)
        for kind in "KV"
        for r in range(step, d, step)
    }


def test_measured_ranks_go_where_the_loss_is_within_the_budget():
    losses = _synthetic_rank_losses(4, 64, 8, hard=(2, "K"))
    rk, rv, predicted = allocate_ranks_measured(losses, 4, 64, 0.5, 8)
    assert sum(rk) + sum(rv) <= 0.5 * 2 * 64 * 4
    assert rk[2] == 64  # the costly one gets full rank, the rest share what is left
    assert all(r % 8 == 0 and 8 <= r <= 64 for r in rk + rv)
    assert predicted == pytest.approx(
        sum(losses.get((i // 2, "KV"[i % 2], r), 0.0) for i, r in enumerate(_zip(rk, rv)))
    )
    full_k, full_v, zero = allocate_ranks_measured(losses, 4, 64, 1.0, 8)
    assert full_k == full_v == [64] * 4 and zero == 0.0
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks_measured(losses, 4, 64, 0.0, 8)
    with pytest.raises(ValueError, match="rank_step"):
        allocate_ranks_measured(losses, 4, 64, 0.5, 24)


def _zip(rk, rv):
    return [r for pair in zip(rk, rv) for r in pair]


def test_hack_plan_is_the_cheapest_loss_within_the_byte_budget():
    nl, kvh, d, p = 3, 2, 64, 64
    widths = hack_widths(d)
    assert widths == [32, 64]
    # layer 1 is sensitive (like the reference model's layer 5): 2 bits or width 32 cost a lot
    losses = {
        (layer, w, b): (0.5 if layer == 1 else 0.01) * (64 / w) * (4 / b) ** 2 / 4
        for layer in range(nl)
        for w in widths
        for b in (2, 4)
    }
    nbytes = {(w, b): hack_layer_bytes(kvh, p, w, b) for w in widths for b in (2, 4)}
    assert nbytes[(64, 2)] == kvh * HackCodec(kvh, p, 64, 2).page_bytes_per_token()
    budget = 2 * nbytes[(32, 2)] + nbytes[(64, 4)]
    plan, used, predicted = plan_hack(losses, nl, kvh, d, p, budget)
    assert (plan.widths[1], plan.bits[1]) == (64, 4)
    assert used <= budget and used == sum(nbytes[wb] for wb in zip(plan.widths, plan.bits))
    options = list(itertools.product(widths, (2, 4)))
    best = min(
        sum(losses[(i, *o)] for i, o in enumerate(combo))
        for combo in itertools.product(options, repeat=nl)
        if sum(nbytes[o] for o in combo) <= budget
    )
    assert predicted == pytest.approx(best)


# -- the plan file -----------------------------------------------------------------------------
def _model_with_plan(tmp_path, widths=None, bits=None, text=None):
    """The reference model's files (and its bases) linked into tmp_path, with its own plan."""
    for f in REFERENCE_MODEL.iterdir():
        if f.name != PLAN_FILE:
            (tmp_path / f.name).symlink_to(f.resolve())
    if widths is not None:
        text = json.dumps({"widths": widths, "bits": bits})
    if text is not None:
        (tmp_path / PLAN_FILE).write_text(text)
    return str(tmp_path)


@pytest.mark.skipif(not HAVE_REF, reason="reference checkpoint not present")
def test_missing_or_invalid_plan_is_a_clear_error(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(LowRankPlanError, match=r"lowrank_hack\.json.*calibrate --lowrank-hack"):
        make_codec(MIX_NAME, 2, 64, 64, model_dir=_model_with_plan(bare))
    for i, (widths, bits) in enumerate(
        [
            ([32] * 6, [2, 2, 3, 2, 2, 2]),  # 3 bits
            ([48] * 6, [2] * 6),  # not a power of two
            ([128] * 6, [2] * 6),  # wider than head_dim
            ([16] * 6, [2] * 6),  # below HACK's channel group
            ([32] * 5, [2] * 6),  # lengths differ
        ]
    ):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        with pytest.raises(LowRankPlanError, match=r"lowrank_hack\.json.*calibrate --lowrank-hack"):
            make_codec(MIX_NAME, 2, 64, 64, model_dir=_model_with_plan(d, widths, bits))
    d = tmp_path / "junk"
    d.mkdir()
    with pytest.raises(LowRankPlanError, match="not valid JSON"):
        make_codec(MIX_NAME, 2, 64, 64, model_dir=_model_with_plan(d, text="{nope"))
    five = tmp_path / "five"
    five.mkdir()
    with pytest.raises(LowRankPlanError, match="6 layers"):  # a valid plan of another model
        load_hack_plan(_model_with_plan(five, [32] * 5, [2] * 5), num_layers=6)
    with pytest.raises(ValueError, match="model directory"):
        make_codec(MIX_NAME, 2, 64, 64)


def test_random_model_gets_a_stand_in_plan_for_speed_runs():
    plan = load_hack_plan("random:tiny")
    c = make_codec(MIX_NAME, 2, 64, 32, model_dir="random:tiny")
    assert [(lc.width, lc.bits, lc.rk, lc.rv) for lc in c.layers] == [
        (w, b, w, w) for w, b in zip(plan.widths, plan.bits)
    ]
    assert plan.bits[-1] == 4 and c.graph_safe  # decode captured in CUDA graphs (GPU test)


@pytest.mark.skipif(not HAVE_REF, reason="reference checkpoint not present")
def test_layers_have_the_planned_widths_bits_and_bytes(tmp_path):
    widths, bits = [32, 32, 64, 32, 32, 64], [2, 4, 2, 2, 2, 4]
    model = _model_with_plan(tmp_path, widths, bits)
    c = make_codec(MIX_NAME, 2, 64, 64, model_dir=model)
    full = LowRankBases.load(MODEL, ranks=([64] * 6, [64] * 6))
    for i, lc in enumerate(c.layers):
        assert isinstance(lc, LowRankLayerCodec) and lc.name == MIX_NAME
        assert (lc.width, lc.bits, lc.rk, lc.rv) == (widths[i], bits[i], widths[i], widths[i])
        # the bases are the calibrated ones cut to the width
        assert torch.equal(lc._bases_cpu["k_enc"], full.layers[i]["k_enc"][:, :, : widths[i]])
    want = sum(hack_layer_bytes(2, 64, w, b) for w, b in zip(widths, bits))
    assert c.bytes_per_token(6) == pytest.approx(want)
    llm = LLM(model, device="cpu", codec=MIX_NAME, num_pages=16)
    assert [x.width for x in llm.engine.cache.codecs] == widths
    store = llm.engine.cache.stores[0]
    assert sum(t[0].numel() * t.element_size() for t in store.values()) == pytest.approx(
        64 * hack_layer_bytes(2, 64, 32, 2)
    )


@pytest.mark.skipif(not HAVE_REF, reason="reference checkpoint not present")
def test_wire_pages_carry_each_layers_width_and_decode_equals_one_engine(tmp_path):
    """prefill worker -> decode worker through the wire: each layer's pages have its planned
    width; decode equals one engine's; every page comes back."""
    widths, bits = [32, 64, 32, 32, 32, 64], [2, 2, 4, 2, 2, 4]
    model = _model_with_plan(tmp_path, widths, bits)
    prompts = [list(range(100, 300)), list(range(3, 40))]
    want = LLM(model, device="cpu", codec=MIX_NAME).generate(prompts, PARAMS)

    def engine(**kw):
        return DisaggregatedEngine(
            model, device="cpu", engine_config=EngineConfig(codec=MIX_NAME, **kw)
        )

    # the prompt is prefilled twice on `pre`: with its prefix cache the second would reuse the
    # first's (lossy) pages and compute only the rest, which one whole-prompt engine does not
    pre, dec = engine(prefix_caching=False), engine()
    layers = pre.prefill_export(prompts[0], PARAMS, "x").layers
    for i, kv in enumerate(layers):
        pages = unpack_pages(kv.pages)
        assert pages.codec == MIX_NAME and pages.num_pages == 3
        assert pages.tensors["k_codes"].shape[-1] * 8 // bits[i] == widths[i]
    pool_whole(pre)
    hand_over(pre, [dec], prompts, PARAMS)
    done = run_to_completion(dec)
    assert [done[f"r{i}"].token_ids for i in range(2)] == [w.token_ids for w in want]
    pool_whole(pre)
    pool_whole(dec)


# -- measuring on the reference model ------------------------------------------------------------
@pytest.fixture(scope="module")
def measured():
    """One 256-token training window of the reference model, its forward and full-rank bases."""
    from zipserve.bench import quality_breakdown as qb
    from zipserve.train.corpus import load_corpus

    torch.set_num_threads(1)
    config, net, tok = qb.load(MODEL)
    wins = qb.windows(tok, load_corpus().train[300:310], 1, 256)
    full = LowRankBases.load(MODEL, ranks=([64] * 6, [64] * 6))
    return qb, qb.Setup(net, config, "lowrank", model_dir=MODEL), wins, full.layers


@pytest.mark.skipif(not HAVE_REF, reason="reference checkpoint not present")
def test_measured_losses_are_the_tools_subset_perplexities(measured):
    """A rank loss is the quality tool's NLL with that layer/kind at that rank, minus bf16's;
    smaller ranks lose more on the reference model's most sensitive layer."""
    qb, setup, wins, bases = measured
    losses = rank_losses(setup, wins, 128, bases, [16, 48])
    assert set(losses) == {(i, k, r) for i in range(6) for k in "KV" for r in (16, 48)}
    assert losses[(5, "K", 16)] > losses[(5, "K", 48)] > -1e-3
    hl = hack_option_losses(setup, wins, 128, bases)
    assert set(hl) == {(i, w, b) for i in range(6) for w in (32, 64) for b in (2, 4)}
    assert hl[(5, 32, 2)] > hl[(5, 64, 4)]
    assert not setup.codecs  # the measuring codecs are gone


@pytest.mark.parametrize("bits", [2, 4])
def test_hack_encoder_at_width_32_matches_its_reference(bits):
    """lowrank+hack2mix runs HACK at width 32 in its reduced layers: the Triton encoder (with the
    codec's Hadamard rotation) equals its torch reference there, up to rounding ties."""
    from zipserve.compress.rotation import hadamard
    from zipserve.kernels.hack_encode import hack_encode_pages, hack_encode_pages_ref
    from zipserve.kernels.hack_layout import HackPages, hack_group_v, unpack_planar

    g = torch.Generator().manual_seed(bits)
    n, kvh, p, d = 3, 2, 64, 32
    k, v = torch.randn(n, kvh, p, d, generator=g), torch.randn(n, kvh, p, d, generator=g)
    k[..., :2] = k[..., :2] * 4 + 3  # outlier channels
    gv = hack_group_v(d, bits, 32)
    ids = torch.tensor([4, 0, 2], dtype=torch.int32)
    pools = []
    for fn in (hack_encode_pages, hack_encode_pages_ref):
        pool = HackPages.empty(6, kvh, p, d, bits, gv)
        pools.append(fn(k, v, bits, gv, out=pool, page_ids=ids, rotation=hadamard(d, "cpu")))
    a, b = pools
    for name in ("k_codes", "v_codes"):
        ca, cb = (unpack_planar(getattr(x, name), bits).int() for x in (a, b))
        assert (ca - cb).abs().max() <= 1 and (ca != cb).float().mean() < 1e-3
    for name in ("k_scale", "k_min", "v_scale", "v_min", "k_sums", "v_sums"):
        x, y = getattr(a, name).float(), getattr(b, name).float()
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-3), name
