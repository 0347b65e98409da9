"""The lowrank+hack tail-merge kernel (kernels/lowrank_tail_merge.py): the Triton kernel (in the
interpreter on CPU) against its torch reference on fresh random, strided inputs (fp32 / fp16 / bf16,
GQA groups, head dims 64 / 96 / 128, rows with an empty tail, no pages, or neither); the reference
against float64 attention over pages and tail together (the merge is exact); argument checks; a
GPU variant at a serving shape."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402

from zipserve.kernels.lowrank_tail_merge import (  # noqa: E402
    _lowrank_tail_merge_kernel,
    lowrank_tail_merge,
    lowrank_tail_merge_ref,
    merge_parts_ref,
)
from zipserve.kernels.paged_decode_attention import is_interpreted  # noqa: E402

DEVICE = "cpu" if is_interpreted(_lowrank_tail_merge_kernel) else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}  # relative L2
LN2 = 0.6931471805599453
INF = float("inf")


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _row_lens(b: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """dense_lens int32 [B]: row pattern b % 4 -- 0 pages + tail, 1 empty tail, 2 no pages, 3 both
    empty."""
    lens = torch.randint(1, t + 1, (b,), generator=gen, dtype=torch.int32)
    lens[1::4] = 0
    lens[3::4] = 0
    return lens


def _inputs(gen, b, h, kvh, d, t, w, q_dtype, kv_dtype, device=DEVICE):
    """Arguments of lowrank_tail_merge as strided views: q a head slice of a wider tensor, dense_k a
    (kv head, token) window of a larger buffer, dense_v token-major, o_p narrower than its buffer,
    lse_p transposed. o_p is random in all W columns (only the first rv may count)."""
    q = torch.randn(b, h + 1, d, generator=gen)[:, 1:]  # [B, H, D]
    dk = torch.randn(b, kvh + 1, t + 3, d, generator=gen)[:, 1:, 2 : t + 2]  # [B, KVH, T, D]
    dv = torch.randn(b, t, kvh, d, generator=gen).transpose(1, 2)  # [B, KVH, T, D]
    o_p = torch.randn(b, h, w + 8, generator=gen)[..., :w]  # [B, H, W]
    lse_p = (torch.randn(h, b, generator=gen) * 2 + 4).t()  # [B, H], log2 units
    lse_p[2::4] = -INF  # rows without pages (patterns 2 and 3)
    lse_p[3::4] = -INF
    lse_p[0::4, 0] = -INF  # and one head of the full rows
    lens = _row_lens(b, t, gen)
    return dict(
        q=q.to(device=device, dtype=q_dtype),
        dense_k=dk.to(device=device, dtype=kv_dtype),
        dense_v=dv.to(device=device, dtype=kv_dtype),
        dense_lens=lens.to(device),
        scale=d**-0.5,
        o_p=o_p.to(device),
        lse_p=lse_p.to(device),
    )


CASES = [  # (D, T, W, rv): W in {D // 2, D}, rv in {W, W // 2 + 1}
    (64, 1, 64, 64),
    (64, 65, 32, 17),
    (128, 17, 64, 64),
    (128, 130, 128, 65),
    (96, 65, 96, 49),
]


@pytest.mark.parametrize(
    "q_dtype,kv_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),  # mixed: the dots run in fp32
    ],
)
@pytest.mark.parametrize("b,h,kvh", [(3, 8, 2), (2, 4, 4), (1, 8, 1)])
def test_kernel_matches_reference(q_dtype, kv_dtype, b, h, kvh):
    gen = torch.Generator().manual_seed(1000 * b + 10 * h + kvh)
    for d, t, w, rv in CASES:
        args = _inputs(gen, b, h, kvh, d, t, w, q_dtype, kv_dtype)
        ref = lowrank_tail_merge_ref(**args, rv=rv)
        out = lowrank_tail_merge(**args, rv=rv)
        assert out.shape == (b, h, d) and out.dtype == q_dtype
        assert torch.isfinite(out).all()
        err = _rel_err(out, ref)
        assert err < TOL[q_dtype], (d, t, w, rv, err)


def _orthonormal(w: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthonormal fp32 [w, w] (the pages' rotation need not be a Hadamard matrix)."""
    return (
        torch.linalg.qr(torch.randn(w, w, generator=gen, dtype=torch.float64))[0]
        .float()
        .contiguous()
    )


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_rotated_pages_match_reference_and_the_unrotated_merge(q_dtype):
    """With rotation R, o_p is in the pages' basis and the kernel takes o_p @ R back itself: the
    same as the reference, and as merging the unrotated o_p @ R without a rotation."""
    gen = torch.Generator().manual_seed(23)
    b, h, kvh = 5, 8, 2
    for d, t, w, rv in CASES:
        args = _inputs(gen, b, h, kvh, d, t, w, q_dtype, q_dtype)
        rot = _orthonormal(w, gen).to(DEVICE)
        ref = lowrank_tail_merge_ref(**args, rv=rv, rotation=rot)
        out = lowrank_tail_merge(**args, rv=rv, rotation=rot)
        assert out.dtype == q_dtype and torch.isfinite(out).all()
        assert _rel_err(out, ref) < TOL[q_dtype], (d, t, w, rv)
        unrotated = dict(args, o_p=(args["o_p"].double() @ rot.double()).float())
        plain = lowrank_tail_merge_ref(**unrotated, rv=rv)
        assert _rel_err(ref, plain) < (1e-6 if q_dtype == torch.float32 else 2e-3)
        assert _rel_err(ref, lowrank_tail_merge_ref(**args, rv=rv)) > 1e-2  # R mattered


@pytest.mark.parametrize("fn", [lowrank_tail_merge, lowrank_tail_merge_ref])
def test_rows_with_an_empty_side(fn):
    """Empty tail: the pages' output (columns >= rv zero); no pages: the tail's; neither: zeros."""
    b, h, kvh, d, t, w, rv = 4, 8, 2, 64, 40, 48, 30
    args = _inputs(
        torch.Generator().manual_seed(5), b, h, kvh, d, t, w, torch.float32, torch.float32
    )
    out = fn(**args, rv=rv).cpu()
    o_p, lse_p = args["o_p"].cpu(), args["lse_p"].cpu()
    assert torch.allclose(out[1, :, :rv], o_p[1, :, :rv], atol=1e-6)  # pages only
    assert (out[1, :, rv:] == 0).all()
    assert torch.isinf(lse_p[2]).all() and (out[2] != 0).any()  # tail only
    assert (out[3] == 0).all()  # neither: a padding row


def _float64_case(gen, b, h, kvh, d, t, w, rv, n_pages, n_parts=None):
    """Pages as real keys / values: o_p and lse_p from float64 softmax attention over them, and the
    expected output of float64 attention over pages and tail together (page values zero past rv).
    With n_parts, o_p / lse_p are [B, H, S, W] / [B, H, S] partials as a split kernel leaves them:
    each row's page tokens cut at random points into S runs (some empty: lse -inf, o_p NaN, which
    must not be read)."""
    g = h // kvh
    scale = d**-0.5
    q = torch.randn(b, h, d, generator=gen, dtype=torch.float64)
    dk = torch.randn(b, kvh, t, d, generator=gen, dtype=torch.float64)
    dv = torch.randn(b, kvh, t, d, generator=gen, dtype=torch.float64)
    lens = _row_lens(b, t, gen)
    parts = n_parts or 1
    o_p = torch.full((b, h, parts, w), float("nan"), dtype=torch.float64)
    lse_p = torch.full((b, h, parts), -INF, dtype=torch.float64)
    want = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = n_pages[i]
        kp = torch.randn(kvh, n, d, generator=gen, dtype=torch.float64) * 1.5
        vp = torch.randn(kvh, n, w, generator=gen, dtype=torch.float64)  # all W columns random
        qi = q[i].view(kvh, g, d)
        s_p = torch.einsum("kgd,knd->kgn", qi, kp) * scale  # [KVH, G, n], natural log units
        cuts = torch.randint(0, n + 1, (parts - 1,), generator=gen).sort().values.tolist()
        for j, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, n])):
            if hi > lo:
                o_p[i, :, j] = (s_p[..., lo:hi].softmax(-1) @ vp[:, lo:hi]).reshape(h, w)
                lse_p[i, :, j] = (torch.logsumexp(s_p[..., lo:hi], -1) / LN2).reshape(h)
        if n == 0:
            o_p[i] = 0.0  # a pre-merged row without pages: zeros, as HACK's merge writes
        s_t = torch.einsum("kgd,ktd->kgt", qi, dk[i, :, : lens[i]]) * scale  # [KVH, G, len]
        s = torch.cat([s_p, s_t], -1)
        if s.shape[-1] == 0:
            continue
        v_pages = torch.nn.functional.pad(vp[..., :rv], (0, d - rv))  # [KVH, n, D]
        v = torch.cat([v_pages, dv[i, :, : lens[i]]], 1)  # [KVH, n + len, D]
        want[i] = (s.softmax(-1) @ v).reshape(h, d)
    if n_parts is None:
        o_p, lse_p = o_p[:, :, 0], lse_p[:, :, 0]
    args = dict(
        q=q.float(),
        dense_k=dk.float(),
        dense_v=dv.float(),
        dense_lens=lens,
        scale=scale,
        o_p=o_p.float(),
        lse_p=lse_p.float(),
    )
    return args, want


@pytest.mark.parametrize("fn", [lowrank_tail_merge_ref, lowrank_tail_merge])
def test_merge_equals_float64_attention_over_pages_and_tail(fn):
    gen = torch.Generator().manual_seed(11)
    b, h, kvh, d, t, w, rv = 4, 8, 2, 96, 33, 64, 40
    args, want = _float64_case(gen, b, h, kvh, d, t, w, rv, n_pages=[50, 17, 0, 0])
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = fn(**args, rv=rv).cpu()
    assert _rel_err(out, want) < 1e-5
    assert (out[3] == 0).all()  # no pages, empty tail


@pytest.mark.parametrize("fn", [lowrank_tail_merge_ref, lowrank_tail_merge])
@pytest.mark.parametrize("n_parts", [2, 9, 17])
def test_partials_merge_equals_float64_attention(fn, n_parts):
    """The pages as S split partials (HACK's kernel's, unmerged): merged here with each other and
    the tail, the same float64 attention; empty partials (NaN outputs) are not read."""
    gen = torch.Generator().manual_seed(100 + n_parts)
    b, h, kvh, d, t, w, rv = 4, 8, 2, 128, 33, 64, 40
    args, want = _float64_case(gen, b, h, kvh, d, t, w, rv, [70, 3, 0, 0], n_parts=n_parts)
    assert torch.isinf(args["lse_p"][1]).any()  # 3 tokens in >= 2 runs: some run is empty
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = fn(**args, rv=rv).cpu()
    assert torch.isfinite(out).all()
    assert _rel_err(out, want) < 1e-5
    assert (out[3] == 0).all()


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotate", [False, True])
def test_partials_kernel_matches_reference(q_dtype, rotate):
    """Random partials (strided views, dead ones NaN) through the kernel and the reference."""
    gen = torch.Generator().manual_seed(31)
    b, h, kvh, s = 5, 8, 2, 9
    for d, t, w, rv in CASES:
        args = _inputs(gen, b, h, kvh, d, t, w, q_dtype, q_dtype)
        o_p = torch.randn(b, h, s + 1, w + 4, generator=gen)[:, :, 1:, :w]  # [B, H, S, W]
        lse_p = (torch.randn(b, s, h, generator=gen) * 3 + 2).transpose(1, 2)  # [B, H, S]
        dead = torch.rand(b, h, s, generator=gen) < 0.3
        lse_p[dead] = -INF
        lse_p[2::4] = -INF  # rows without pages
        o_p[dead] = float("nan")
        args.update(o_p=o_p.to(DEVICE), lse_p=lse_p.to(DEVICE))
        rot = _orthonormal(w, gen).to(DEVICE) if rotate else None
        ref = lowrank_tail_merge_ref(**args, rv=rv, rotation=rot)
        out = lowrank_tail_merge(**args, rv=rv, rotation=rot)
        assert torch.isfinite(out).all() and torch.isfinite(ref).all()
        assert _rel_err(out, ref) < TOL[q_dtype], (d, t, w, rv)


def test_merge_parts_ref_equals_the_premerged_call():
    """S partials through merge_parts_ref, then the one-partial call: the partials' call."""
    gen = torch.Generator().manual_seed(41)
    args, _ = _float64_case(gen, 3, 4, 2, 64, 9, 32, 20, [12, 0, 5], n_parts=4)
    o, lse = merge_parts_ref(args["o_p"], args["lse_p"])
    assert o.shape == (3, 4, 32) and lse.shape == (3, 4)
    assert torch.isinf(lse[1]).all() and (o[1] == 0).all()
    one = lowrank_tail_merge_ref(**dict(args, o_p=o, lse_p=lse), rv=20)
    assert _rel_err(one, lowrank_tail_merge_ref(**args, rv=20)) < 1e-6


@pytest.mark.parametrize("fn", [lowrank_tail_merge, lowrank_tail_merge_ref])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tail_read_in_place_equals_the_gathered_tail(fn, dtype):
    """dense_rows / dense_start: sequence b's tail is row dense_rows[b] of a buffer of more rows,
    from column dense_start[b] (the compressed cache's tail buffer, as HACK's kernel reads it).
    Equal to the same ranges gathered into [B, KVH, T, D]; rows of the buffer nobody names (and
    columns outside each range) may hold anything."""
    gen = torch.Generator().manual_seed(23)
    b, h, kvh, d, w, rv, slots, t = 4, 8, 2, 64, 48, 30, 6, 72
    args = _inputs(gen, b, h, kvh, d, 8, w, dtype, dtype)
    buf_k = torch.randn(slots, kvh, t, d, generator=gen).to(DEVICE, dtype)  # [slots, KVH, T, D]
    buf_v = torch.randn(slots, kvh, t, d, generator=gen).to(DEVICE, dtype)
    rows = torch.tensor([5, 0, 3, 2], dtype=torch.int32, device=DEVICE)
    start = torch.tensor([4, 0, 4, 0], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([65, 7, 0, 68], dtype=torch.int32, device=DEVICE)
    n = t - 4  # the widest range the gathered form needs
    cols = start[:, None].long() + torch.arange(n, device=DEVICE)  # [B, n]
    gathered = {
        "dense_k": buf_k[rows.long()[:, None], :, cols].transpose(1, 2).contiguous(),
        "dense_v": buf_v[rows.long()[:, None], :, cols].transpose(1, 2).contiguous(),
    }
    args.pop("dense_k"), args.pop("dense_v")  # 8-token tails: replaced by the buffer
    common = dict(args, dense_lens=lens, rv=rv)
    want = lowrank_tail_merge_ref(**{**common, **gathered})
    got = fn(**common, dense_k=buf_k, dense_v=buf_v, dense_rows=rows, dense_start=start)
    assert _rel_err(got, want) < TOL[dtype]
    with pytest.raises(ValueError, match="dense_rows"):
        fn(**common, dense_k=buf_k, dense_v=buf_v, dense_rows=rows.long(), dense_start=start)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="dense_lens"):  # a range past the buffer's end
            fn(
                **{**common, "dense_lens": lens + 8},
                dense_k=buf_k,
                dense_v=buf_v,
                dense_rows=rows,
                dense_start=start,
            )


def _valid_args():
    gen = torch.Generator().manual_seed(3)
    args = _inputs(gen, 2, 4, 2, 64, 9, 32, torch.float32, torch.float32, "cpu")
    return dict(args, rv=20, rotation=_orthonormal(32, gen))


def _bad(**changes):
    def make():
        args = _valid_args()
        for k, f in changes.items():
            args[k] = f(args[k])
        return args

    return make


BAD = [
    ("q", _bad(q=lambda q: q[0])),
    ("head_dim", _bad(q=lambda q: q[..., :7])),
    ("dense_k", _bad(dense_k=lambda x: x.to(torch.int32))),
    ("dense_k", _bad(dense_k=lambda x: x.transpose(2, 3))),  # last dim not contiguous
    ("dense_k", _bad(dense_k=lambda x: x.to("meta"))),  # another device
    ("dense_v", _bad(dense_v=lambda x: x[:, :, :4])),
    ("num_kv_heads", _bad(q=lambda q: q[:, :3])),
    ("dense_lens", _bad(dense_lens=lambda x: x.long())),
    ("dense_lens", _bad(dense_lens=lambda x: x + 100)),  # > T (checked on CPU only)
    ("scale", _bad(scale=lambda s: torch.tensor(s))),
    ("o_p", _bad(o_p=lambda x: x.half())),
    ("o_p", _bad(o_p=lambda x: torch.zeros(2, 4, 0))),  # no columns
    ("lse_p", _bad(lse_p=lambda x: x[:, :2])),
    ("lse_p", _bad(o_p=lambda x: x[:, :, None].expand(-1, -1, 3, -1))),  # [B, H, S, W], lse [B, H]
    ("o_p", _bad(o_p=lambda x: x[:, :, :0, None])),  # S = 0
    ("rv", _bad(rv=lambda r: 0)),
    ("rv", _bad(rv=lambda r: 33)),  # > W
    ("rv", _bad(rv=lambda r: True)),
    ("rotation", _bad(rotation=lambda r: r[:16])),  # not [W, W]
    ("rotation", _bad(rotation=lambda r: r.double())),
    ("rotation", _bad(rotation=lambda r: r.t())),  # not contiguous
]


@pytest.mark.parametrize("fn", [lowrank_tail_merge, lowrank_tail_merge_ref])
@pytest.mark.parametrize("name,make", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_arguments_raise(fn, name, make):
    args = make()
    with pytest.raises(ValueError, match=name):
        fn(**args)


@pytest.mark.gpu
def test_kernel_matches_reference_on_gpu():
    gen = torch.Generator().manual_seed(17)
    b, h, kvh, d, t, w, rv = 8, 32, 8, 128, 65, 64, 40
    args = _inputs(gen, b, h, kvh, d, t, w, torch.bfloat16, torch.bfloat16, "cuda")
    rot = _orthonormal(w, gen).cuda()
    s = 17  # HACK's partials at 16 splits and the tail program
    parts = dict(
        o_p=torch.randn(b, h, s, w, generator=gen).cuda(),
        lse_p=(torch.randn(b, h, s, generator=gen) * 3).cuda(),
    )
    parts["lse_p"][:, :, 0] = -INF  # the empty tail program
    for rotation in (None, rot):
        for pages in ({}, parts):
            ref = lowrank_tail_merge_ref(**dict(args, **pages), rv=rv, rotation=rotation)
            out = lowrank_tail_merge(**dict(args, **pages), rv=rv, rotation=rotation)
            torch.cuda.synchronize()
            assert out.dtype == torch.bfloat16 and out.shape == (b, h, d)
            assert _rel_err(out, ref) < TOL[torch.bfloat16]
