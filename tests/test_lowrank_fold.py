"""The lowrank codec: V's completed basis (pages keep its first r_v coordinates, the 16-bit tail all
of them) folded into W_o equals lifting the output back every step, the tail is exact, full-rank
orthonormal bases reproduce the plain engine, and the encode / decode kernels match their torch
references (which are themselves checked against float64 attention)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zipserve.compress.lowrank import LowRankLayerCodec
from zipserve.compress.lowrank_fold import complete_basis, folded_o_weight
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.kernels.lowrank_decode_attention import (
    lowrank_decode_attention,
    lowrank_decode_attention_ref,
)
from zipserve.kernels.lowrank_encode import lowrank_encode_pages, lowrank_encode_pages_ref

HAVE_REF = (REFERENCE_MODEL / "config.json").exists()
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _whole(llm):
    eng = llm.engine
    assert eng.pool.num_free == eng.pool.capacity, eng.pool.owners()
    assert len(eng.scheduler.free_slots) == eng.engine_config.max_num_seqs


def _orthonormal(kvh: int, d: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(kvh, d, d, generator=g, dtype=torch.float64))
    return q[:, :, :r].float().contiguous()  # [KVH, D, r], orthonormal columns


def _bases_dir(path, ranks, kvh=2, d=32, seed=0):
    """A lowrank.safetensors of random orthonormal bases (enc == dec) for ranks [(rk, rv)] per layer."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i, (rk, rv) in enumerate(ranks):
        bk, bv = _orthonormal(kvh, d, rk, g), _orthonormal(kvh, d, rv, g)
        t.update(
            {
                f"layers.{i}.k_enc": bk,
                f"layers.{i}.k_dec": bk.clone(),
                f"layers.{i}.v_enc": bv,
                f"layers.{i}.v_dec": bv.clone(),
            }
        )
    save_file(t, str(path / "lowrank.safetensors"))
    return str(path)


# -- folding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,kvh", [(4, 4), (8, 2), (8, 1)])
def test_folded_weight_is_the_lift_then_w_o(h, kvh):
    g = torch.Generator().manual_seed(h * 10 + kvh)
    d, rv, hidden, t = 16, 8, 24, 5
    w_o = torch.randn(hidden, h * d, generator=g, dtype=torch.float64)
    v_dec = torch.randn(kvh, d, rv, generator=g, dtype=torch.float64)
    o_red = torch.randn(t, h, rv, generator=g, dtype=torch.float64)
    lifted = torch.stack([o_red[:, j] @ v_dec[j // (h // kvh)].T for j in range(h)], 1)  # [T, H, D]
    want = lifted.reshape(t, h * d) @ w_o.T
    got = o_red.reshape(t, h * rv) @ folded_o_weight(w_o, v_dec).T
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d,r", [(16, 5), (64, 24), (32, 32)])
def test_completed_basis_is_an_inverse_pair_extending_the_calibrated_one(d, r):
    """A whitened (non-orthogonal) pair like calibrate's: enc = S U, dec = S^-1 U."""
    g = torch.Generator().manual_seed(d + r)
    kvh = 2
    a = torch.randn(kvh, d, d, generator=g, dtype=torch.float64)
    s = a @ a.transpose(1, 2) + 0.1 * torch.eye(d, dtype=torch.float64)  # [KVH, D, D] SPD
    u, _ = torch.linalg.qr(torch.randn(kvh, d, d, generator=g, dtype=torch.float64))
    enc, dec = (s @ u)[:, :, :r], (torch.linalg.inv(s) @ u)[:, :, :r]
    enc_full, dec_full = complete_basis(enc, dec)
    assert enc_full.shape == dec_full.shape == (kvh, d, d)
    assert torch.allclose(enc_full[:, :, :r], enc.float()) and torch.allclose(
        dec_full[:, :, :r], dec.float()
    )
    eye = torch.eye(d, dtype=torch.float64).expand(kvh, d, d)
    prod = dec_full.double().transpose(1, 2) @ enc_full.double()
    assert (prod - eye).abs().max().item() < 1e-4 * max(1.0, enc.abs().max().item())
    # a value's first r coordinates lifted alone are its projection v @ enc @ dec^T
    v = torch.randn(3, kvh, d, generator=g, dtype=torch.float64)
    vt = torch.einsum("thd,hde->the", v, enc_full.double())
    vt[..., r:] = 0
    lifted = torch.einsum("the,hde->thd", vt, dec_full.double())
    want = torch.einsum("thd,hdr,her->the", v, enc, dec)
    assert ((lifted - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("bits", [None, 2])
def test_sealing_the_dense_form_stores_what_encoding_stores(bits):
    """seal() gets the open page in the dense form (V in its completed basis, all D coordinates);
    it must store the same pages as encode() of the raw K/V: V's first r_v coordinates only
    (lowrank+hack: zeros past them in the HACK width, not the complement's coordinates)."""
    g = torch.Generator().manual_seed(3)
    kvh, p, d, rk, rv = 2, 64, 32, 8, 12
    bases = {
        "k_enc": _orthonormal(kvh, d, rk, g),
        "v_enc": _orthonormal(kvh, d, rv, g),
    }
    bases["k_dec"], bases["v_dec"] = bases["k_enc"].clone(), bases["v_enc"].clone()
    codec = LowRankLayerCodec("lowrank", kvh, p, d, bases, bits)
    k, v = torch.randn(2, kvh, p, d, generator=g), torch.randn(2, kvh, p, d, generator=g)
    kd, vd = codec.to_dense(k.transpose(1, 2), v.transpose(1, 2))  # [n, P, KVH, D]
    assert vd[..., rv:].abs().max().item() > 0  # the tail keeps the complement too
    ids = torch.tensor([1, 0])
    a, b = codec.new_store(3, "cpu"), codec.new_store(3, "cpu")
    codec.encode(a, ids, k, v)
    codec.seal(b, ids, kd.transpose(1, 2).contiguous(), vd.transpose(1, 2).contiguous())
    (ka, va), (kb, vb) = codec.dequantize(a, ids), codec.dequantize(b, ids)
    assert (va[..., rv:] == 0).all() and (vb[..., rv:] == 0).all()
    bound = 1e-5 if bits is None else 0.05  # float16 pages / a rare 2-bit code flip
    assert _rel(vb, va) < bound and _rel(kb, ka) < bound
    # the tail's V lifted back is v itself (a change of basis), pages' V its projection
    assert _rel(codec.lift_v(vd.transpose(1, 2)), v) < 1e-5
    want = torch.einsum("nhpd,hdr,her->nhpe", v, bases["v_enc"], bases["v_dec"])
    assert _rel(codec.lift_v(va), want) < (1e-3 if bits is None else 0.5)


@pytest.mark.parametrize("bits", [None, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_writes_the_dense_form_of_each_page(bits, dtype):
    """decode_kv=dense: store page i lands in pool page page_ids[i] as `dequantize` gives it (K
    at full dimension, V in its completed basis, zero past r_v), in the pool's dtype; pool pages
    not named keep what they held."""
    g = torch.Generator().manual_seed(5)
    kvh, p, d, rk, rv = 2, 16, 32, 8, 12
    bases = {"k_enc": _orthonormal(kvh, d, rk, g), "v_enc": _orthonormal(kvh, d, rv, g)}
    bases["k_dec"], bases["v_dec"] = bases["k_enc"].clone(), bases["v_enc"].clone()
    codec = LowRankLayerCodec("lowrank", kvh, p, d, bases, bits)
    k, v = torch.randn(3, kvh, p, d, generator=g), torch.randn(3, kvh, p, d, generator=g)
    store = codec.new_store(3, "cpu")
    codec.encode(store, torch.arange(3), k, v)
    want_k, want_v = codec.dequantize(store, torch.arange(3))  # fp32 [3, KVH, P, D]
    out_k = torch.full((6, kvh, p, d), 7.0, dtype=dtype)
    out_v = torch.full_like(out_k, 7.0)
    ids = torch.tensor([4, 0, 2], dtype=torch.int32)
    codec.dequantize_into(store, ids, out_k, out_v)
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(out_k[ids.long()].float(), want_k) < bound
    assert _rel(out_v[ids.long()].float(), want_v) < bound
    assert (out_v[ids.long()][..., rv:] == 0).all()
    assert (out_k[[1, 3, 5]] == 7).all() and (out_v[[1, 3, 5]] == 7).all()
    if bits is None:  # the K stand-in scores as the reduced pages do: q . k == (q k_dec) . k_red
        q = torch.randn(kvh, d, generator=g)
        k_red = torch.einsum("nhpd,hdr->nhpr", k, bases["k_enc"])
        scores = torch.einsum("hd,nhpd->nhp", q, out_k[ids.long()].float())
        want = torch.einsum("hr,nhpr->nhp", torch.einsum("hd,hdr->hr", q, bases["k_dec"]), k_red)
        assert _rel(scores, want) < (2e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(not HAVE_REF, reason="reference checkpoint not present")
@pytest.mark.parametrize("codec", ["lowrank", "lowrank+hack4"])
def test_folded_reference_model_equals_unfolded(codec):
    """Folded and lifting engines on the shipped bases: logits of a 130-token sequence (scored page
    by page) within 1e-4 of the largest logit; for lowrank, greedy decode crossing a page boundary
    (prompt 110 + 24 tokens) unchanged (lowrank+hack's decode path is held to scoring in
    test_codecs; folding is the same code for both). lowrank+hack4: the two o_proj round
    differently in float32, which can flip a 4-bit code at a rounding tie when a later layer's
    page is encoded; rows that read no encoded page (the first two pages) stay within 1e-4, the
    rows after within 2e-3 (on the shipped bases: one row of 130, 5e-4)."""
    llms = {
        f: LLM(
            str(REFERENCE_MODEL),
            device="cpu",
            codec=codec,
            lowrank_fold=f,
            num_pages=16,
            max_num_seqs=2,
        )
        for f in (True, False)
    }
    folded, lifted = llms[True], llms[False]
    assert folded.engine.model.layers[0].self_attn.o_proj.weight.shape[1] == 4 * 64  # H * D
    ids = folded.tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    " * 12)[:130]
    a, b = folded.logits(ids), lifted.logits(ids)
    top = b.abs().max().item()
    if codec == "lowrank":
        assert (a - b).abs().max().item() < 1e-4 * top
    else:
        assert (a - b)[:128].abs().max().item() < 1e-4 * top
        assert (a - b).abs().max().item() < 2e-3 * top
        assert (a - b).abs().mean().item() < 1e-5 * top
    if codec == "lowrank":
        params = SamplingParams(max_tokens=24, **GREEDY)
        outs = {f: llm.generate(ids[:110], params)[0].token_ids for f, llm in llms.items()}
        assert outs[True] == outs[False]
    for llm in llms.values():
        _whole(llm)


def test_random_tiny_folded_equals_unfolded_and_full_rank_equals_plain(tmp_path):
    """random:tiny (d=32, 4 heads / 2 KV heads) with random orthonormal bases: folding changes
    nothing; a prompt within its first page (nothing encoded yet: the 16-bit tail only) is scored
    as the plain engine scores it, at any rank; at full rank the reduced space is a rotation, so
    the engine equals the plain one up to the float16 page storage."""
    low = _bases_dir(tmp_path, [(16, 16), (32, 16)])
    ids = [(7 * i + 3) % 500 + 1 for i in range(140)]
    opts = dict(device="cpu", num_pages=16, max_num_seqs=2, lowrank_bases=low)
    folded = LLM("random:tiny", codec="lowrank", **opts)
    lifted = LLM("random:tiny", codec="lowrank", lowrank_fold=False, **opts)
    a, b = folded.logits(ids), lifted.logits(ids)
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()
    params = SamplingParams(max_tokens=40, **GREEDY)
    want = lifted.generate(ids[:100], params)[0].token_ids
    assert folded.generate(ids[:100], params)[0].token_ids == want
    # The dense tail keeps V in its completed basis (all 32 coordinates) and K as it is.
    cache = folded.engine.cache
    assert cache.open[0, 1, :, :, :, 16:].abs().max().item() > 0.0
    assert cache.open[0, 0, :, :, :, 16:].abs().max().item() > 0.0
    _whole(folded)
    _whole(lifted)
    plain_llm = LLM("random:tiny", device="cpu", num_pages=16, max_num_seqs=2)
    first_page = ids[:60]  # page_size 64: nothing is encoded, the tail is exact
    a, b = plain_llm.logits(first_page), folded.logits(first_page)
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()

    (tmp_path / "full").mkdir()
    full = _bases_dir(tmp_path / "full", [(32, 32), (32, 32)], seed=1)
    plain = plain_llm.logits(ids)
    coded = LLM("random:tiny", codec="lowrank", **dict(opts, lowrank_bases=full)).logits(ids)
    assert (plain - coded).abs().max().item() < 1e-2 * plain.abs().max().item()


# -- kernels ------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize(
    "d,rk,rv,wk,wv",
    [(64, 48, 32, 48, 32), (64, 16, 64, 64, 64), (128, 80, 128, 80, 128), (128, 32, 48, 64, 64)],
)
@pytest.mark.parametrize(
    "in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)]
)
def test_encode_kernel_matches_reference(d, rk, rv, wk, wv, in_dtype, out_dtype):
    g = torch.Generator().manual_seed(d + rk + rv)
    n, kvh, p = 3, 2, 64
    k = torch.randn(n, kvh, p, d, generator=g).to(in_dtype)
    v = torch.randn(n, kvh, p, d, generator=g).to(in_dtype)
    kb, vb = torch.randn(kvh, d, rk, generator=g), torch.randn(kvh, d, rv, generator=g)
    ids = torch.tensor([4, 0, 2])
    res = []
    for fn in (lowrank_encode_pages, lowrank_encode_pages_ref):
        for v_basis in (vb, None):  # None: v already projected (sealing an open page)
            ok = torch.full((5, kvh, p, wk), 7.0, dtype=out_dtype)  # 7: untouched pages keep it
            ov = torch.full((5, kvh, p, wv), 7.0, dtype=out_dtype)
            fn(k, v, kb, v_basis, ok, ov, ids)
            res.append((ok, ov))
    bound = 1e-6 if out_dtype == torch.float32 else 2e-3
    for (ok, ov), (rk_, rv_) in ((res[0], res[2]), (res[1], res[3])):
        assert _rel(ok, rk_) < bound and _rel(ov, rv_) < bound
        assert (ok[[1, 3]] == 7).all() and (ov[[1, 3]] == 7).all()
        assert (ok[ids][..., rk:] == 0).all()
    rk_, rv_ = res[2]
    assert (res[0][1][ids][..., rv:] == 0).all()
    assert torch.equal(res[3][1][ids][..., : min(d, wv)], v[..., :wv].to(out_dtype))
    # The reference is the fp32 projection itself.
    want = torch.einsum("nhpd,hdr->nhpr", k.double(), kb.double())
    assert _rel(rk_[ids][..., :rk], want) < bound


@pytest.mark.parametrize("project_v", [True, False])
def test_encode_kernel_reads_rows_in_place_and_skips_the_scratch_page(project_v):
    """A decode step's seal: page i from row src_rows[i] of the open pages, programs whose page is
    skip_page write nothing, an already projected V keeps its first v_cols columns (zeros past
    them). The kernel equals the reference, and both equal encoding the gathered rows."""
    g = torch.Generator().manual_seed(11)
    slots, kvh, p, d, rk, rv, w = 5, 2, 64, 64, 24, 40, 48
    k = torch.randn(slots, kvh, p, d, generator=g).bfloat16()
    v = torch.randn(slots, kvh, p, d, generator=g).bfloat16()
    kb, vb = torch.randn(kvh, d, rk, generator=g), torch.randn(kvh, d, rv, generator=g)
    v_basis, v_cols = (vb, None) if project_v else (None, rv)
    rows = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    ids = torch.tensor([2, 0, 5, 0])  # page 0: the scratch page (rows 0 and 1 fill no page)
    got = []
    for fn in (lowrank_encode_pages, lowrank_encode_pages_ref):
        ok = torch.full((6, kvh, p, w), 7.0)
        ov = torch.full((6, kvh, p, w), 7.0)
        fn(k, v, kb, v_basis, ok, ov, ids, src_rows=rows, skip_page=0, v_cols=v_cols)
        got.append((ok, ov))
    (ok, ov), (rk_, rv_) = got
    assert _rel(ok, rk_) < 1e-6 and _rel(ov, rv_) < 1e-6
    for out in (ok, ov, rk_, rv_):  # the scratch page and unused pages untouched
        assert (out[[0, 1, 3, 4]] == 7).all()
    keep = torch.tensor([0, 2])  # the rows that fill a page
    wk = torch.full((6, kvh, p, w), 7.0)
    wv = torch.full((6, kvh, p, w), 7.0)
    v_in = v[rows[keep].long()]
    if not project_v:  # what the caller passed before: V cut to its first r_v, zero padded
        v_in = torch.nn.functional.pad(v_in[..., :rv], (0, d - rv))
    lowrank_encode_pages_ref(k[rows[keep].long()], v_in, kb, v_basis, wk, wv, ids[keep])
    assert torch.equal(rk_, wk) and torch.equal(rv_, wv)
    if not project_v:
        assert (rv_[ids[keep]][..., rv:] == 0).all()
    with pytest.raises(ValueError, match="src_rows"):
        lowrank_encode_pages_ref(k, v, kb, vb, ok, ov, ids, src_rows=rows.long())
    with pytest.raises(ValueError, match="v_cols"):
        lowrank_encode_pages_ref(k, v, kb, None, ok, ov, ids, src_rows=rows, v_cols=d + 1)


def test_encode_skips_by_skip_ids_into_scratch_rows():
    """lowrank+hack's seal: page i goes to scratch row i (page_ids 0..m-1) and is skipped when its
    pool page (skip_ids[i]) is the scratch page; kernel == reference == encoding the kept rows."""
    g = torch.Generator().manual_seed(12)
    slots, kvh, p, d, rk, w = 5, 2, 64, 64, 24, 32
    k = torch.randn(slots, kvh, p, d, generator=g).bfloat16()
    v = torch.randn(slots, kvh, p, d, generator=g).bfloat16()
    kb = torch.randn(kvh, d, rk, generator=g)
    rows = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    pool_pages = torch.tensor([9, 0, 5, 0])  # rows 1 and 3 fill no page: scratch page 0
    scratch_rows = torch.arange(4, dtype=torch.int32)
    got = []
    for fn in (lowrank_encode_pages, lowrank_encode_pages_ref):
        ok = torch.full((4, kvh, p, w), 7.0)
        ov = torch.full((4, kvh, p, w), 7.0)
        fn(
            k,
            v,
            kb,
            None,
            ok,
            ov,
            scratch_rows,
            src_rows=rows,
            skip_page=0,
            v_cols=rk,
            skip_ids=pool_pages,
        )
        got.append((ok, ov))
    (ok, ov), (rk_, rv_) = got
    assert _rel(ok, rk_) < 1e-6 and _rel(ov, rv_) < 1e-6
    for out in (ok, ov, rk_, rv_):
        assert (out[[1, 3]] == 7).all() and not (out[[0, 2]] == 7).any()
    wk = torch.full((4, kvh, p, w), 7.0)
    wv = torch.full((4, kvh, p, w), 7.0)
    keep = torch.tensor([0, 2])
    lowrank_encode_pages_ref(
        k[rows[keep].long()], v[rows[keep].long()], kb, None, wk, wv, scratch_rows[keep], v_cols=rk
    )
    assert torch.equal(rk_, wk) and torch.equal(rv_, wv)
    with pytest.raises(ValueError, match="skip_ids"):
        lowrank_encode_pages_ref(
            k,
            v,
            kb,
            None,
            ok,
            ov,
            scratch_rows,
            src_rows=rows,
            skip_page=0,
            v_cols=rk,
            skip_ids=pool_pages[:3],
        )


@pytest.mark.parametrize("bits", [None, 2])
def test_seal_rows_seals_only_the_filled_rows_in_place(bits):
    """LowRankLayerCodec.seal_rows (the decode step's seal): the rows that fill a page are stored
    as seal() stores them, rows sealing into the scratch page write nothing there."""
    g = torch.Generator().manual_seed(5)
    slots, kvh, p, d, rk, rv = 4, 2, 64, 32, 8, 12
    bases = {"k_enc": _orthonormal(kvh, d, rk, g), "v_enc": _orthonormal(kvh, d, rv, g)}
    bases["k_dec"], bases["v_dec"] = bases["k_enc"].clone(), bases["v_enc"].clone()
    codec = LowRankLayerCodec("lowrank", kvh, p, d, bases, bits)
    k, v = torch.randn(slots, p, kvh, d, generator=g), torch.randn(slots, p, kvh, d, generator=g)
    kd, vd = codec.to_dense(k, v)
    open_k, open_v = kd.transpose(1, 2), vd.transpose(1, 2)  # [slots, KVH, P, D] views
    rows = torch.tensor([2, 0, 3], dtype=torch.int32)
    ids = torch.tensor([0, 3, 1])  # row 2 fills no page (scratch page 0)
    a, b = codec.new_store(4, "cpu"), codec.new_store(4, "cpu")
    for t in a.values():
        t.fill_(3)  # the scratch page must keep what it held
    for t in b.values():
        t.fill_(3)
    codec.seal_rows(a, ids, open_k, open_v, rows, 0)
    filled = rows[1:].long()
    codec.seal(b, ids[1:], open_k[filled].contiguous(), open_v[filled].contiguous())
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert (a[name][0] == 3).all() and (a[name][2] == 3).all(), name


def _decode_case(g, b, h, kvh, d, rk, rv, dtype, tails, pages):
    p, n = 64, 12
    q = torch.randn(b, h, d, generator=g).to(dtype)
    q_red = torch.randn(b, h, d, generator=g).to(dtype)[..., :rk]  # a view of a wider buffer
    kp = torch.randn(n, kvh, p, rk, generator=g).half()
    vp = torch.randn(n, kvh, p, rv, generator=g).half()
    table = torch.stack([torch.randperm(n - 1, generator=g)[:4] + 1 for _ in range(b)]).int()
    dk = torch.randn(b, kvh, p, d, generator=g).to(dtype)
    dv = torch.randn(b, kvh, p, d, generator=g).to(dtype)
    return dict(
        q=q,
        q_red=q_red,
        k_pages=kp,
        v_pages=vp,
        page_table=table,
        n_pages=torch.tensor(pages, dtype=torch.int32),
        dense_k=dk,
        dense_v=dv,
        dense_lens=torch.tensor(tails, dtype=torch.int32),
        scale=d**-0.5,
    )


@pytest.mark.parametrize("h,kvh", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("d,rk,rv,dv", [(64, 48, 32, 64), (128, 80, 128, 128), (64, 24, 40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_kernel_matches_reference(h, kvh, d, rk, rv, dv, dtype):
    """Rows of 2*64 (len mod 64 == 0), 3*64+1, 63 and 4*64+63 tokens, plus a padding row. The
    output is as wide as the tail's V (dv: D in the engine, or a view of fewer columns)."""
    g = torch.Generator().manual_seed(h * 100 + kvh + d + rk)
    args = _decode_case(
        g, 5, h, kvh, d, rk, rv, dtype, tails=[0, 1, 63, 63, 0], pages=[2, 3, 0, 4, 0]
    )
    args["dense_v"] = args["dense_v"][..., :dv]
    want = lowrank_decode_attention_ref(**args)
    bound = 1e-5 if dtype == torch.float32 else 5e-3
    for splits in (1, 3):
        got = lowrank_decode_attention(**args, num_splits=splits)
        assert got.shape == (5, h, dv)
        assert _rel(got[:4], want[:4]) < bound, splits
        assert (got[4] == 0).all()


def test_decode_reference_is_float64_attention_on_projected_kv():
    """Orthonormal bases B: the reference's o_T lifted by V's completed decode basis equals float64
    attention of q on pages projected (k B_k B_k^T, v B_v B_v^T) and an exact tail (K as it is, V
    in the completed basis)."""
    g = torch.Generator().manual_seed(5)
    b, h, kvh, d, rk, rv, p = 2, 4, 2, 64, 32, 48, 64
    bk, bv = _orthonormal(kvh, d, rk, g).double(), _orthonormal(kvh, d, rv, g).double()
    v_enc_full, v_dec_full = (x.double() for x in complete_basis(bv, bv))
    q = torch.randn(b, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, kvh, 3 * p, d, generator=g, dtype=torch.float64)  # 2 pages + 64 tail slots
    v = torch.randn(b, kvh, 3 * p, d, generator=g, dtype=torch.float64)
    tails = [5, 63]
    kr, vr = torch.einsum("bktd,kdr->bktr", k, bk), torch.einsum("bktd,kdr->bktr", v, bv)
    vt = torch.einsum("bktd,kde->bkte", v, v_enc_full)  # the tail's form
    pages = lambda x: x[:, :, : 2 * p].reshape(b, kvh, 2, p, -1).transpose(1, 2).flatten(0, 1)  # noqa: E731
    q_red = torch.einsum("bkgd,kdr->bkgr", q.view(b, kvh, h // kvh, d), bk).reshape(b, h, rk)
    args = dict(
        q=q.float(),
        q_red=q_red.float(),
        k_pages=pages(kr).half(),
        v_pages=pages(vr).half(),
        page_table=torch.arange(2 * b, dtype=torch.int32).view(b, 2),
        n_pages=torch.tensor([2, 2], dtype=torch.int32),
        dense_k=k[:, :, 2 * p :].float().contiguous(),
        dense_v=vt[:, :, 2 * p :].float().contiguous(),
        dense_lens=torch.tensor(tails, dtype=torch.int32),
        scale=d**-0.5,
    )
    o_t = lowrank_decode_attention_ref(**args).double()  # [B, H, D]
    got = torch.einsum("bkge,kde->bkgd", o_t.view(b, kvh, h // kvh, d), v_dec_full)
    kproj = torch.einsum("bktr,kdr->bktd", kr, bk)
    kproj[:, :, 2 * p :] = k[:, :, 2 * p :]  # the tail's keys are exact
    vproj = torch.einsum("bktr,kdr->bktd", vr, bv)
    vproj[:, :, 2 * p :] = v[:, :, 2 * p :]  # and its values
    for i in range(b):
        n = 2 * p + tails[i]
        s = torch.einsum("kgd,knd->kgn", q[i].view(kvh, h // kvh, d), kproj[i, :, :n]) * d**-0.5
        want = torch.einsum("kgn,knd->kgd", s.softmax(-1), vproj[i, :, :n])
        assert _rel(got[i], want) < 2e-3  # float16 pages


def test_decode_kernel_refuses_bad_input():
    g = torch.Generator().manual_seed(0)
    args = _decode_case(g, 2, 4, 2, 64, 48, 32, torch.float32, tails=[1, 1], pages=[1, 1])
    with pytest.raises(ValueError, match="k_pages"):
        lowrank_decode_attention_ref(**dict(args, k_pages=args["k_pages"].float()))
    with pytest.raises(ValueError, match="rank"):
        lowrank_decode_attention_ref(**dict(args, q_red=args["q_red"][..., :40]))
    with pytest.raises(ValueError, match="dense_k"):
        lowrank_decode_attention_ref(**dict(args, dense_k=args["dense_k"][..., :48]))
    with pytest.raises(ValueError, match="dense_v"):
        lowrank_decode_attention(**dict(args, dense_v=args["dense_v"][..., :16]))


# -- GPU (the lead's device): compiled kernels, bf16, engine shapes --------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "h,kvh,d,rk,rv", [(32, 8, 128, 64, 64), (32, 8, 128, 80, 48), (4, 2, 64, 48, 32)]
)
def test_gpu_kernels_match_references(h, kvh, d, rk, rv):
    g = torch.Generator().manual_seed(h + d + rk)
    args = _decode_case(
        g,
        6,
        h,
        kvh,
        d,
        rk,
        rv,
        torch.bfloat16,
        tails=[0, 1, 63, 36, 5, 0],
        pages=[4, 3, 1, 2, 4, 0],
    )
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    want = lowrank_decode_attention_ref(**args)
    for splits in (1, 2, 4):
        got = lowrank_decode_attention(**args, num_splits=splits)
        assert _rel(got[:5], want[:5]) < 2e-2 and (got[5] == 0).all()
    k = torch.randn(5, kvh, 64, d, generator=g).bfloat16().cuda()
    v = torch.randn(5, kvh, 64, d, generator=g).bfloat16().cuda()
    kb, vb = (
        torch.randn(kvh, d, rk, generator=g).cuda(),
        torch.randn(kvh, d, rv, generator=g).cuda(),
    )
    ids = torch.tensor([6, 0, 2, 5, 1], device="cuda")
    res = []
    for fn in (lowrank_encode_pages, lowrank_encode_pages_ref):
        ok = torch.zeros(8, kvh, 64, rk, dtype=torch.float16, device="cuda")
        ov = torch.zeros(8, kvh, 64, rv, dtype=torch.float16, device="cuda")
        res.append(fn(k, v, kb, vb, ok, ov, ids))
    assert _rel(res[0][0], res[1][0]) < 2e-3 and _rel(res[0][1], res[1][1]) < 2e-3
    vd = torch.nn.functional.pad(v[..., :rv], (0, d - rv)).contiguous()  # already projected
    sealed = [
        fn(
            k,
            vd,
            kb,
            None,
            torch.zeros(8, kvh, 64, rk, dtype=torch.float16, device="cuda"),
            torch.zeros(8, kvh, 64, rv, dtype=torch.float16, device="cuda"),
            ids,
        )
        for fn in (lowrank_encode_pages, lowrank_encode_pages_ref)
    ]
    assert torch.equal(sealed[0][1], sealed[1][1]) and _rel(sealed[0][0], sealed[1][0]) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_REF, reason="reference checkpoint not present")
@pytest.mark.parametrize("codec", ["lowrank", "lowrank+hack4"])
def test_gpu_folded_equals_unfolded(codec):
    """test_folded_reference_model_equals_unfolded on the GPU, over 300 tokens. For lowrank+hack4
    the same allowance as there: the two o_proj round differently in float32, which can flip a
    4-bit code at a rounding tie when a later page is encoded, so rows that read no encoded page
    (the first two pages) are held tight and the rest loosely, and greedy outputs are compared for
    lowrank only (an H100 run held every row to 1e-3: lowrank+hack4 failed with 4.7e-3 at one
    row, session 6). The mean bound is 1e-3: a flipped code moves every row after it a little
    (an H100 measured 1.1e-4 x top over 300 rows, session 12), a wrong fold moves them all by a
    good part of top."""
    llms = {
        f: LLM(
            str(REFERENCE_MODEL),
            device="cuda",
            dtype="float32",
            codec=codec,
            lowrank_fold=f,
            num_pages=64,
        )
        for f in (True, False)
    }
    ids = llms[True].tokenizer.encode("def main(argv):\n    return 0\n" * 40)[:300]
    a, b = llms[True].logits(ids), llms[False].logits(ids)
    top = b.abs().max().item()
    if codec == "lowrank":
        assert (a - b).abs().max().item() < 1e-3 * top
        params = SamplingParams(max_tokens=64, **GREEDY)
        outs = {f: llm.generate([ids[:100], ids[:200]], params) for f, llm in llms.items()}
        assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    else:
        assert (a - b)[:128].abs().max().item() < 1e-3 * top
        assert (a - b).abs().max().item() < 2e-2 * top
        assert (a - b).abs().mean().item() < 1e-3 * top
    for llm in llms.values():
        _whole(llm)


def test_fold_v_projection_emits_v_in_the_completed_basis():
    """The folded qkv_proj: q and k rows as before, v rows give v @ T per KV head (bias too), and
    the original module is left as it was (another engine may share its weights)."""
    from zipserve.compress.lowrank_fold import fold_v_projection

    g = torch.Generator().manual_seed(5)
    hidden, q_size, kvh, d = 24, 32, 2, 8
    old = torch.nn.Linear(hidden, q_size + 2 * kvh * d, bias=True)
    with torch.no_grad():
        old.weight.copy_(torch.randn(old.weight.shape, generator=g))
        old.bias.copy_(torch.randn(old.bias.shape, generator=g))
    before = old.weight.detach().clone()
    t = torch.randn(kvh, d, d, generator=g)
    new = fold_v_projection(old, t, q_size)
    x = torch.randn(5, hidden, generator=g)
    want, got = old(x).detach(), new(x).detach()
    qk = q_size + kvh * d
    assert torch.allclose(got[:, :qk], want[:, :qk])
    v_want = torch.einsum("nkd,kde->nke", want[:, qk:].view(5, kvh, d), t).reshape(5, -1)
    assert _rel(got[:, qk:], v_want) < 1e-5
    assert torch.equal(old.weight, before) and new is not old
