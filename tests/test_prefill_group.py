"""Sequence-parallel prefill (prefill_group/): 2 and 4 gloo ranks on CPU give the logits and the
decode-side KV of a single prefill worker, per codec; the all-to-all byte counts match the
formula, and the low-rank exchange shrinks them by the rank ratio; unsupported GQA splits and
too-short prompts are refused with the numbers named."""

from __future__ import annotations

import pytest
import torch

from zipserve.compress.codecs import make_codec
from zipserve.compress.lowrank_bases import LowRankBases
from zipserve.compress.wire import LayerKV, unpack_pages
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.config import EngineConfig
from zipserve.engine.disaggregated import DisaggregatedEngine
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.prefill_group.exchange import expected_layer_bytes
from zipserve.prefill_group.local import LocalJob, run_local, run_threads
from zipserve.prefill_group.plan import UnsupportedSplit, plan_heads, token_slices
from zipserve.prefill_group.rank import GroupRank
from zipserve.prefill_group.slices import assemble_layer, export_slice

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)  # 6 layers, 4 query heads, 2 kv heads, head_dim 64
PAGE = 32
PROMPT = torch.randint(3, 8000, (136,), generator=torch.Generator().manual_seed(0)).tolist()
CODECS = ("bf16", "fp8", "hack2", "kivi2", "lowrank", "lowrank+hack2")


def _jobs(codecs=CODECS) -> list[LocalJob]:
    return [
        LocalJob(MODEL, c, [PROMPT], page_size=PAGE, keep_raw=True, all_logits=True) for c in codecs
    ]


@pytest.fixture(scope="module")
def groups():
    """{n: {codec: GroupResult}}: 2 and 4 gloo ranks as threads of this process, and n=1 (no
    group) for lowrank (test_spawned_processes_give_the_same runs 2 ranks as processes)."""
    out = {n: dict(zip(CODECS, (r[0] for r in run_threads(n, _jobs())))) for n in (2, 4)}
    out[1] = {"lowrank": run_threads(1, _jobs(["lowrank"]))[0][0]}
    return out


@pytest.fixture(scope="module")
def reference():
    """Single-worker engine prefill: logits of every token and the exported KV per codec."""
    logits = LLM(MODEL, device="cpu", page_size=PAGE, num_pages=16).logits(PROMPT)  # [T, V]
    layers = {}
    for codec in ("bf16", "fp8", "hack2", "kivi2"):
        eng = DisaggregatedEngine(
            MODEL,
            device="cpu",
            engine_config=EngineConfig(codec=codec, page_size=PAGE, num_pages=16, max_num_seqs=4),
        )
        layers[codec] = eng.prefill_export(PROMPT, SamplingParams(max_tokens=1), "ref").layers
    return logits, layers


def _raw(res, layer):
    """(k, v) [T, KVH, D] of one layer, the group's slices concatenated."""
    return (
        torch.cat([r.raw_kv[layer][0] for r in res.ranks]),
        torch.cat([r.raw_kv[layer][1] for r in res.ranks]),
    )


# -- plan -----------------------------------------------------------------------------------
def test_head_split_rules():
    assert plan_heads(32, 8, 4).kv_per_rank == 2
    sp = plan_heads(4, 2, 4)  # kv heads replicated to 2 ranks each
    assert (sp.q_per_rank, sp.kv_per_rank, sp.kv_replicas) == (1, 1, 2)
    assert [sp.kv_heads(r) for r in range(4)] == [
        slice(0, 1),
        slice(0, 1),
        slice(1, 2),
        slice(1, 2),
    ]
    # every rank's query heads belong to the kv heads it holds
    for h, kvh, n in [(32, 8, 2), (32, 8, 8), (32, 8, 16), (32, 8, 32), (4, 2, 4), (12, 4, 2)]:
        sp, g = plan_heads(h, kvh, n), h // kvh
        for r in range(n):
            q = range(*sp.q_heads(r).indices(h))
            assert {i // g for i in q} <= set(range(*sp.kv_heads(r).indices(kvh)))
    with pytest.raises(UnsupportedSplit, match=r"3 workers and 2 kv heads"):
        plan_heads(12, 2, 3)
    with pytest.raises(UnsupportedSplit, match=r"6 workers and 4 kv heads"):
        plan_heads(24, 4, 6)
    with pytest.raises(UnsupportedSplit, match=r"64 workers cannot split 32 query heads"):
        plan_heads(32, 8, 64)


def test_group_refuses_unsupported_split_at_start():
    with pytest.raises(UnsupportedSplit, match=r"3 workers cannot split 4 query heads"):
        GroupRank(MODEL, "bf16", rank=0, n=3, page_size=PAGE)
    with pytest.raises(UnsupportedSplit, match=r"8 workers cannot split 4 query heads"):
        GroupRank(MODEL, "bf16", rank=0, n=8, page_size=PAGE)


def test_token_slices_are_page_aligned():
    s = token_slices(200, 4, 32)  # 7 pages: 2, 2, 2, 1
    assert [(x.start, x.end) for x in s] == [(0, 64), (64, 128), (128, 192), (192, 200)]
    s = token_slices(136, 4, 32)  # the tests' prompt: 5 pages
    assert [(x.start, x.end) for x in s] == [(0, 64), (64, 96), (96, 128), (128, 136)]
    s = token_slices(256, 2, 64)
    assert [(x.start, x.end) for x in s] == [(0, 128), (128, 256)]
    with pytest.raises(UnsupportedSplit, match=r"97 tokens has 4 pages of 32; 5 workers"):
        token_slices(97, 5, 32)


# -- equality with a single prefill worker --------------------------------------------------
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("codec", ["bf16", "hack2", "kivi2"])
def test_logits_equal_single_worker(groups, reference, n, codec):
    want = reference[0]
    got = groups[n][codec].token_logits()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(groups[n][codec].logits, want[-1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [2, 4])
def test_bf16_kv_equals_single_worker(groups, reference, n):
    got = groups[n]["bf16"].layers("x")
    want = reference[1]["bf16"]
    assert len(got) == len(want) == 6
    res = groups[n]["bf16"]  # dense bytes: every layer's K and V of every prompt token
    kvh, d = res.ranks[0].raw_kv[0][0].shape[1:]
    elem = res.ranks[0].raw_kv[0][0].element_size()
    assert res.dense_bytes == len(got) * 2 * len(PROMPT) * kvh * d * elem
    for g, w in zip(got, want):
        gw, ww = unpack_pages(g.pages), unpack_pages(w.pages)
        assert (g.layer, g.num_tokens, gw.codec, gw.num_pages) == (
            w.layer,
            w.num_tokens,
            ww.codec,
            ww.num_pages,
        )
        for name in ("k", "v"):
            torch.testing.assert_close(gw.tensors[name], ww.tensors[name], rtol=1e-5, atol=1e-5)
        assert g.tail.keys() == w.tail.keys() == {"open_k", "open_v"}  # 136 = 4 pages + 8
        for name in g.tail:
            torch.testing.assert_close(g.tail[name], w.tail[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("codec", ["fp8", "hack2", "kivi2", "lowrank", "lowrank+hack2"])
def test_codec_pages_equal_single_encode_of_same_tokens(groups, reference, n, codec):
    """The N encoded slices, assembled, are byte for byte the one-shot encode of the same K/V;
    and (exact-attention codecs) that K/V is the single worker's K/V within fp32 rounding."""
    res = groups[n][codec]
    codec_obj = make_codec(codec, 2, PAGE, 64, MODEL)
    for layer, got in enumerate(res.layers("x")):
        k, v = _raw(res, layer)
        whole = assemble_layer(
            [export_slice(codec_obj.for_layer(layer), codec, layer, k, v, 0, len(PROMPT), PAGE, 0)]
        )
        assert got.pages == whole.pages
        assert got.tail.keys() == whole.tail.keys()
        for name in got.tail:
            assert torch.equal(got.tail[name], whole.tail[name]), name
        if not codec.startswith("lowrank"):  # the single worker's export: same layout, tail
            want = reference[1][codec][layer]
            assert got.tail.keys() == want.tail.keys()
            for name in got.tail:
                torch.testing.assert_close(got.tail[name], want.tail[name], rtol=1e-5, atol=1e-5)
            assert unpack_pages(got.pages).num_pages == unpack_pages(want.pages).num_pages
    ref_layer = reference[1]["bf16"][3]  # whole pages [pages, KVH, P, D] + open [KVH, r, D]
    ref = unpack_pages(ref_layer.pages).tensors
    ref_k, ref_v = (
        torch.cat(
            [ref[m].transpose(1, 2).flatten(0, 1), ref_layer.tail[f"open_{m}"].transpose(0, 1)]
        )
        for m in ("k", "v")
    )
    if not codec.startswith("lowrank"):
        k, v = _raw(res, 3)
        torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)


def test_decode_from_assembled_kv_matches_single_engine(groups):
    """The decode worker imports the 4 ranks' assembled layers and generates what one engine
    does; every page returns to its pool."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    opts = {"page_size": PAGE, "num_pages": 16, "max_num_seqs": 4}
    want = LLM(MODEL, device="cpu", **opts).generate(PROMPT, params)[0].token_ids
    dec = DisaggregatedEngine(MODEL, device="cpu", engine_config=EngineConfig(**opts))
    res = groups[4]["bf16"]
    dec.reserve("r", PROMPT, params)
    for kv in res.layers("r"):
        dec.import_layer("r", LayerKV.from_bytes(kv.to_bytes()))
    dec.admit("r", int(res.logits[0].argmax()))
    got = None
    while dec.has_unfinished():
        for out in dec.step():
            if out.finished:
                got = out.token_ids
    dec.release("r")
    assert got == want
    assert dec.pool.num_free == dec.pool.capacity, dec.pool.owners()
    assert not dec.scheduler.reserved


def test_spawned_processes_give_the_same(groups):
    """The 2-rank group as two spawned processes (each its own gloo endpoint): same logits, the
    same KV pages and the same byte counts as the thread-run group."""
    res = run_local(2, [LocalJob(MODEL, "hack2", [PROMPT], page_size=PAGE)])[0][0]
    ref = groups[2]["hack2"]
    torch.testing.assert_close(res.logits, ref.logits, rtol=1e-5, atol=1e-5)
    assert [kv.pages for kv in res.layers()] == [kv.pages for kv in ref.layers()]
    assert res.sent_bytes() == ref.sent_bytes() > 0


# -- low-rank exchange -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4])
def test_lowrank_group_equals_single_rank_lowrank(groups, reference, n):
    """Reduced-dimension attention is an approximation of exact prefill; split over N ranks it
    gives what one rank computing the same reduced attention gives."""
    got, one = groups[n]["lowrank"], groups[1]["lowrank"]
    torch.testing.assert_close(got.token_logits(), one.token_logits(), rtol=1e-4, atol=1e-4)
    for layer in range(6):
        for a, b in zip(_raw(got, layer), _raw(one, layer)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # it really is the reduced path, not exact attention
    assert not torch.allclose(got.token_logits(), reference[0], atol=1e-2)


def test_reduced_attention_with_full_rank_bases_is_exact(reference):
    """With identity bases (r = head_dim) the reduced-space path is exact prefill: checks the
    projection, the GQA head mapping of k_dec/v_dec and the lift, independent of calibration."""
    member = GroupRank(MODEL, "bf16", rank=0, n=1, page_size=PAGE)
    eye = torch.eye(64).expand(2, 64, 64)
    rot = torch.linalg.qr(torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1)))[0]
    for k_basis, v_basis in [(eye, eye), (rot, rot.flip(1))]:  # any orthonormal basis
        member.bases = LowRankBases(
            [
                {"k_enc": k_basis, "k_dec": k_basis, "v_enc": v_basis, "v_dec": v_basis}
                for _ in range(6)
            ],
            {},
        )
        got = member.prefill(PROMPT, all_logits=True).logits
        torch.testing.assert_close(got, reference[0], rtol=1e-4, atol=1e-4)


def test_lowrank_codec_with_full_exchange_is_exact_prefill(reference):
    """lowrank_exchange=False (serve: --prefill-group-exchange full): the lowrank codec's group
    attends over full Q/K/V, so its logits are exact prefill's, and it still sends the codec's
    reduced pages to the decode side; its layers (pages and the 16-bit tail, whose V travels in
    the completed basis the decode side's open page keeps) are the single prefill worker's."""
    job = LocalJob(
        MODEL, "lowrank", [PROMPT], page_size=PAGE, all_logits=True, lowrank_exchange=False
    )
    res = run_threads(2, [job])[0][0]
    torch.testing.assert_close(res.token_logits(), reference[0], rtol=1e-4, atol=1e-4)
    assert 0 < res.kv_bytes < res.dense_bytes / 1.5  # reduced K/V pages on the wire
    eng = DisaggregatedEngine(
        MODEL,
        device="cpu",
        engine_config=EngineConfig(codec="lowrank", page_size=PAGE, num_pages=16, max_num_seqs=4),
    )
    want = eng.prefill_export(PROMPT, SamplingParams(max_tokens=1), "ref").layers
    for got, w in zip(res.layers("x"), want):
        assert got.tail.keys() == w.tail.keys() == {"open_k", "open_v"}
        for name in got.tail:
            torch.testing.assert_close(got.tail[name], w.tail[name], rtol=1e-4, atol=1e-4)
        gp, wp = unpack_pages(got.pages), unpack_pages(w.pages)
        for name in ("k", "v"):
            torch.testing.assert_close(gp.tensors[name], wp.tensors[name], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("n", [2, 4])
def test_all_to_all_bytes_match_formula_and_lowrank_reduction(groups, n):
    bases = make_codec("lowrank", 2, PAGE, 64, MODEL).bases
    full = groups[n]["bf16"]
    low = groups[n]["lowrank"]
    for res in (full, low):
        for recs in res.records:  # 2 all-to-alls per layer on every rank
            assert [(r.name, r.layer) for r in recs] == [
                (m, i) for i in range(6) for m in ("qkv", "out")
            ]
    total_full = total_low = 0
    for layer in range(6):
        rk = bases.layers[layer]["k_enc"].shape[-1]
        rv = bases.layers[layer]["v_enc"].shape[-1]
        want_full = expected_layer_bytes(4, 2, n, 64, 64, 4, len(PROMPT))
        want_low = expected_layer_bytes(4, 2, n, rk, rv, 4, len(PROMPT))
        for name in ("qkv", "out"):
            got_full = sum(
                r.sent_bytes
                for recs in full.records
                for r in recs
                if (r.name, r.layer) == (name, layer)
            )
            got_low = sum(
                r.sent_bytes
                for recs in low.records
                for r in recs
                if (r.name, r.layer) == (name, layer)
            )
            recv = sum(
                r.recv_bytes
                for recs in low.records
                for r in recs
                if (r.name, r.layer) == (name, layer)
            )
            assert got_full == want_full[name] and got_low == want_low[name] == recv
        total_full += sum(want_full.values())
        total_low += sum(want_low.values())
    assert full.sent_bytes() == total_full and low.sent_bytes() == total_low
    assert full.sent_bytes() > 0 and low.sent_bytes() / full.sent_bytes() < 0.6
    assert groups[1]["lowrank"].sent_bytes() == 0  # one rank exchanges nothing


# -- serve flags -----------------------------------------------------------------------------
def test_serve_flags_are_validated(capsys):
    from zipserve.control.config import ServeConfig
    from zipserve.deploy.cli import main

    assert ServeConfig(model=MODEL, prefill_group=4, prefill_group_min_tokens=256).group.use_group(
        256
    )
    assert not ServeConfig(
        model=MODEL, prefill_group=2, prefill_group_min_tokens=256
    ).group.use_group(255)
    assert not ServeConfig(model=MODEL).group.enabled
    assert ServeConfig(
        model=MODEL, prefill_group=2, prefill_group_min_tokens=256
    ).group.lowrank_exchange
    assert not ServeConfig(
        model=MODEL, prefill_group=2, prefill_group_min_tokens=256, prefill_group_exchange="full"
    ).group.lowrank_exchange
    with pytest.raises(
        ValueError,
        match=r"--prefill-group-exchange: must be one of lowrank, "
        r"full, got 'half'",
    ):
        ServeConfig(model=MODEL, prefill_group=2, prefill_group_exchange="half")
    with pytest.raises(
        ValueError,
        match=r"--prefill-group: prefill group: 3 workers cannot split"
        r" 4 query heads",
    ):
        ServeConfig(model=MODEL, prefill_group=3)
    with pytest.raises(ValueError, match=r"--prefill-group: a group needs at least 2 workers"):
        ServeConfig(model=MODEL, prefill_group=1)
    with pytest.raises(ValueError, match=r"--prefill-group-min-tokens: must be at least 256"):
        ServeConfig(model=MODEL, prefill_group=4, prefill_group_min_tokens=100)
    assert main(["serve", "--model", MODEL, "--prefill-group", "8"]) == 2
    assert "8 workers cannot split 4 query heads" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_group_equals_single_gpu():
    """2 GPUs over NCCL (bf16): last-token logits and the decode-side KV of one GPU's prefill."""
    prompt = torch.randint(3, 8000, (1000,), generator=torch.Generator().manual_seed(2)).tolist()
    jobs = [LocalJob(MODEL, c, [prompt], page_size=64) for c in ("bf16", "lowrank")]
    one, two = run_local(1, jobs, device="cuda"), run_local(2, jobs, device="cuda")
    for a, b in zip(one, two):
        torch.testing.assert_close(b[0].logits, a[0].logits, rtol=0.05, atol=0.05)
        for x, y in zip(a[0].layers(), b[0].layers()):
            wx, wy = unpack_pages(x.pages), unpack_pages(y.pages)
            assert wx.num_pages == wy.num_pages
            for name in wx.tensors:
                if wx.tensors[name].is_floating_point():
                    torch.testing.assert_close(
                        wy.tensors[name].float(), wx.tensors[name].float(), rtol=0.05, atol=0.05
                    )


def test_slices_travel_as_bytes_and_assemble_as_they_arrive(groups):
    """The decode side's SliceAssembler: slices in any order, through bytes; a layer comes out
    when its last slice arrives, equal to assembling them directly; duplicates are refused and
    a dropped request leaves nothing behind."""
    from zipserve.compress.wire import slice_to_bytes
    from zipserve.prefill_group.slices import SliceAssembler

    res = groups[4]["hack2"]
    want = res.layers("r")
    asm, got = SliceAssembler(), {}
    order = [(rank, layer) for layer in range(6) for rank in (3, 1, 0, 2)]
    for i, (rank, layer) in enumerate(order):
        out = asm.add(slice_to_bytes(res.slices[rank][layer], "r", 4))
        assert (out is not None) == (i % 4 == 3)
        if out is not None:
            got[out.layer] = out
    assert asm.pending() == 0
    for layer in range(6):
        assert got[layer].pages == want[layer].pages and got[layer].request_id == "r"
        assert got[layer].tail.keys() == want[layer].tail.keys()
    asm.add(slice_to_bytes(res.slices[0][0], "q", 4))
    with pytest.raises(ValueError, match="rank 0 arrived twice"):
        asm.add(slice_to_bytes(res.slices[0][0], "q", 4))
    asm.drop("q")
    assert asm.pending() == 0
    assert asm.add(slice_to_bytes(res.slices[0][0], "gone", 4), accept=lambda rid: False) is None
    assert asm.pending() == 0
    with pytest.raises(ValueError, match="not a zipserve KV slice"):
        asm.add(b"garbage")
