"""Tests for the baseline decode-attention kernels: KIVI 2/4-bit pages (dequantize in kernel) and FP8 pages.

Triton kernels run under TRITON_INTERPRET=1 on CPU (fp16 / fp32 only: bf16 dots are wrong there; float8
loads and conversions do work in the interpreter, so the fp8 kernel is tested on CPU too).
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # must precede importing triton / the kernel modules

import pytest  # noqa: E402

from zipserve.compress.quantize import k_per_channel, v_per_token  # noqa: E402
from zipserve.kernels.fp8_decode_attention import (  # noqa: E402
    fp8_bytes_per_token,
    fp8_decode_attention,
    fp8_decode_attention_ref,
)
from zipserve.kernels.hack_layout import pack_planar  # noqa: E402
from zipserve.kernels.kivi_decode_attention import (  # noqa: E402
    kivi_bytes_per_token,
    kivi_decode_attention,
    kivi_decode_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = 64
FP8 = torch.float8_e4m3fn


def rel_err(out, ref):
    return (
        (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
    ).item()


def rand_kv(gen, shape, outliers=True):
    """K/V-like data: gaussian, with a few large-offset / large-scale channels when outliers."""
    x = torch.randn(*shape, generator=gen)
    if outliers:
        d = shape[-1]
        x[..., : d // 16] = x[..., : d // 16] * 4 + 3
    return x


def _layout(seed, rows, kvh, group, d, dtype, extra_pages=2):
    """Random sequences: rows = [(n_pages, dense_len)].  Returns the raw per-page K/V [n, KVH, P, D] (fp32),
    pool ids of each page, the call kwargs shared by both kernels (dense tail, table, lengths) and q.

    Pages land at shuffled pool ids; page_table entries past a row's pages are -1 and unused dense
    slots hold NaN, so stray reads show up.
    """
    gen = torch.Generator().manual_seed(seed)
    B, H = len(rows), kvh * group
    n_used = sum(n for n, _ in rows)
    num_pages = n_used + extra_pages
    perm = torch.randperm(num_pages, generator=gen)
    kp = rand_kv(gen, (n_used, kvh, P, d))
    vp = rand_kv(gen, (n_used, kvh, P, d), outliers=False)
    page_table = torch.full((B, max(n for n, _ in rows) + 1), -1, dtype=torch.int32)
    used = 0
    for b, (n, _) in enumerate(rows):
        page_table[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    T = max(dl for _, dl in rows) + 3
    dense_k = torch.full((B, kvh, T, d), float("nan"), dtype=dtype)
    dense_v = torch.full((B, kvh, T, d), float("nan"), dtype=dtype)
    for b, (_, dl) in enumerate(rows):
        dense_k[b, :, :dl] = rand_kv(gen, (kvh, dl, d)).to(dtype)
        dense_v[b, :, :dl] = rand_kv(gen, (kvh, dl, d), outliers=False).to(dtype)
    q = torch.randn(B, H, d, generator=gen).to(dtype)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    common = dict(
        page_table=page_table.to(DEVICE),
        n_pages=i32([n for n, _ in rows]),
        dense_k=dense_k.to(DEVICE),
        dense_v=dense_v.to(DEVICE),
        dense_lens=i32([dl for _, dl in rows]),
        scale=d**-0.5,
    )
    return gen, q.to(DEVICE), kp, vp, perm[:n_used], num_pages, common


def make_kivi(seed, rows, kvh, group, d, bits, dtype, tg=32, cg=32):
    """-> (kwargs for kivi_decode_attention, (kd, vd) float64 dequantized pool [N, KVH, P, D])."""
    gen, q, kp, vp, ids, num_pages, common = _layout(seed, rows, kvh, group, d, dtype)
    e = 8 // bits
    kc = torch.randint(0, 256, (num_pages, kvh, P, d // e), generator=gen, dtype=torch.uint8)
    vc = torch.randint(0, 256, (num_pages, kvh, P, d // e), generator=gen, dtype=torch.uint8)
    nan = lambda *s: torch.full(s, float("nan"), dtype=torch.float16)  # noqa: E731
    ks, km = nan(num_pages, kvh, P // tg, d), nan(num_pages, kvh, P // tg, d)
    vs, vm = nan(num_pages, kvh, P, d // cg), nan(num_pages, kvh, P, d // cg)
    kd = torch.full((num_pages, kvh, P, d), float("nan"), dtype=torch.float64)
    vd = kd.clone()
    if len(ids):
        kcodes, ks[ids], km[ids] = k_per_channel(kp, bits, tg)
        vcodes, vs[ids], vm[ids] = v_per_token(vp, bits, cg)
        kc[ids], vc[ids] = pack_planar(kcodes, bits), pack_planar(vcodes, bits)
        # independent float64 dequantization from the unpacked codes
        rep_k = lambda t: t[ids].double().repeat_interleave(tg, 2)  # noqa: E731  [n, KVH, P, D]
        rep_v = lambda t: t[ids].double().repeat_interleave(cg, 3)  # noqa: E731
        kd[ids] = kcodes.double() * rep_k(ks) + rep_k(km)
        vd[ids] = vcodes.double() * rep_v(vs) + rep_v(vm)
    pool = dict(k_codes=kc, k_scale=ks, k_min=km, v_codes=vc, v_scale=vs, v_min=vm)
    args = dict(q=q, **{n: t.to(DEVICE) for n, t in pool.items()}, **common, bits=bits)
    return args, (kd, vd)


def make_fp8(seed, rows, kvh, group, d, dtype):
    """-> (kwargs for fp8_decode_attention, (kd, vd) float64 dequantized pool [N, KVH, P, D])."""
    gen, q, kp, vp, ids, num_pages, common = _layout(seed, rows, kvh, group, d, dtype)
    k8 = (torch.randn(num_pages, kvh, P, d, generator=gen) * 100).to(FP8)
    v8 = (torch.randn(num_pages, kvh, P, d, generator=gen) * 100).to(FP8)
    ksc = torch.full((num_pages, kvh), float("nan"))
    vsc = ksc.clone()
    if len(ids):
        ksc[ids] = kp.abs().amax(dim=(2, 3)) / 448.0
        vsc[ids] = vp.abs().amax(dim=(2, 3)) / 448.0
        k8[ids] = (kp / ksc[ids][:, :, None, None]).to(FP8)
        v8[ids] = (vp / vsc[ids][:, :, None, None]).to(FP8)
    kd = k8.double() * ksc.double()[:, :, None, None]
    vd = v8.double() * vsc.double()[:, :, None, None]
    args = dict(
        q=q,
        k=k8.to(DEVICE),
        k_scale=ksc.to(DEVICE),
        v=v8.to(DEVICE),
        v_scale=vsc.to(DEVICE),
        **common,
    )
    return args, (kd, vd)


def attention_f64(args, kd, vd):
    """Plain float64 attention over the dequantized pages of each row + its dense tail."""
    q = args["q"].cpu().double()
    B, H, D = q.shape
    kvh = kd.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        npg, dl = int(args["n_pages"][b]), int(args["dense_lens"][b])
        ids = args["page_table"][b, :npg].long().cpu()
        kk = torch.cat(
            [
                kd[ids].transpose(0, 1).reshape(kvh, -1, D),
                args["dense_k"][b, :, :dl].cpu().double(),
            ],
            1,
        )
        vv = torch.cat(
            [
                vd[ids].transpose(0, 1).reshape(kvh, -1, D),
                args["dense_v"][b, :, :dl].cpu().double(),
            ],
            1,
        )
        if kk.shape[1] == 0:
            continue
        kk, vv = kk.repeat_interleave(H // kvh, 0), vv.repeat_interleave(H // kvh, 0)
        s = torch.einsum("hd,hnd->hn", q[b], kk) * args["scale"]
        out[b] = torch.einsum("hn,hnd->hd", s.softmax(-1), vv)
    return out


def _cpu(args):
    return {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}


# ---------------------------------------------------------------- bytes


def test_bytes_per_token():
    assert kivi_bytes_per_token(128, 2) == 96
    assert kivi_bytes_per_token(128, 4) == 160
    assert kivi_bytes_per_token(64, 2) == 48
    assert fp8_bytes_per_token(128) == 256.125
    with pytest.raises(ValueError, match="bits"):
        kivi_bytes_per_token(128, 3)
    # agrees with what the pools actually store
    args, _ = make_kivi(0, [(1, 0)], 2, 1, 128, 2, torch.float16)
    pool = [args[n] for n in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")]
    n_tok = args["k_codes"].shape[0] * 2 * P
    assert sum(t.numel() * t.element_size() for t in pool) == kivi_bytes_per_token(128, 2) * n_tok
    args, _ = make_fp8(0, [(1, 0)], 2, 1, 128, torch.float16)
    pool = [args[n] for n in ("k", "k_scale", "v", "v_scale")]
    assert sum(t.numel() * t.element_size() for t in pool) == fp8_bytes_per_token(128) * n_tok


# ---------------------------------------------------------------- KIVI

# (seed, rows [(n_pages, dense_len)], kvh, group, d, bits, splits, dtype): dense_len 0 / 1 / 63, n_pages 0..5,
# padding rows, splits 1 and > n_pages.
KIVI_CASES = [
    (1, [(2, 63), (0, 1), (1, 0)], 2, 1, 64, 2, 1, torch.float32),
    (2, [(3, 1), (0, 0), (2, 63)], 1, 4, 128, 4, 3, torch.float16),
    (3, [(4, 0), (1, 5), (0, 0)], 1, 8, 128, 2, 8, torch.float16),
    (4, [(5, 63), (0, 40)], 2, 4, 64, 4, 2, torch.float16),
    (5, [(0, 0), (3, 30)], 1, 4, 128, 2, 1, torch.float32),
]


@pytest.mark.parametrize("seed,rows,kvh,group,d,bits,splits,dtype", KIVI_CASES)
def test_kivi_kernel_matches_reference(seed, rows, kvh, group, d, bits, splits, dtype):
    args, _ = make_kivi(seed, rows, kvh, group, d, bits, dtype)
    ref = kivi_decode_attention_ref(**args)
    out = kivi_decode_attention(**args, num_splits=splits)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 3e-3)
    for b, (n, dl) in enumerate(rows):
        if n == 0 and dl == 0:
            assert (out[b] == 0).all()


@pytest.mark.parametrize("tg,cg,d", [(64, 128, 128), (16, 16, 64)])
def test_kivi_other_groups(tg, cg, d):
    """Token group == page (one K scale row per page), one V group per token, and small groups."""
    args, (kd, vd) = make_kivi(11, [(2, 7), (1, 0)], 2, 2, d, 2, torch.float32, tg=tg, cg=cg)
    ref = kivi_decode_attention_ref(**args)
    assert rel_err(ref.cpu().double(), attention_f64(args, kd, vd)) < 1e-5
    out = kivi_decode_attention(**args, num_splits=2)
    assert rel_err(out, ref) < 2e-3


@pytest.mark.parametrize(
    "seed,rows,kvh,group,d,bits",
    [
        (21, [(2, 63), (0, 0), (0, 1), (3, 0)], 2, 4, 64, 2),
        (22, [(1, 17), (4, 63)], 1, 8, 128, 4),
    ],
)
def test_kivi_reference_matches_f64(seed, rows, kvh, group, d, bits):
    args, (kd, vd) = make_kivi(seed, rows, kvh, group, d, bits, torch.float32)
    args = _cpu(args)
    ref = kivi_decode_attention_ref(**args)
    want = attention_f64(args, kd, vd)
    assert torch.isfinite(ref).all()
    assert rel_err(ref.double(), want) < 1e-5
    out = torch.full_like(args["q"], float("nan"))
    assert kivi_decode_attention_ref(**args, out=out) is out and torch.equal(out, ref)


def test_kivi_out_and_splits_agree():
    args, _ = make_kivi(31, [(3, 10), (1, 63)], 1, 4, 64, 4, torch.float32)
    out = torch.full_like(args["q"], float("nan"))
    res = kivi_decode_attention(**args, num_splits=3, out=out)
    assert res is out
    one = kivi_decode_attention(**args, num_splits=1)
    assert rel_err(one, out) < 1e-5


# ---------------------------------------------------------------- FP8

FP8_CASES = [
    (41, [(2, 63), (0, 1), (1, 0)], 2, 1, 64, 1, torch.float32),
    (42, [(3, 1), (0, 0), (2, 63)], 1, 4, 128, 3, torch.float16),
    (43, [(4, 0), (1, 5), (0, 0)], 1, 8, 128, 8, torch.float16),
    (44, [(5, 63), (0, 40)], 2, 4, 64, 2, torch.float16),
]


@pytest.mark.parametrize("seed,rows,kvh,group,d,splits,dtype", FP8_CASES)
def test_fp8_kernel_matches_reference(seed, rows, kvh, group, d, splits, dtype):
    args, _ = make_fp8(seed, rows, kvh, group, d, dtype)
    ref = fp8_decode_attention_ref(**args)
    out = fp8_decode_attention(**args, num_splits=splits)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 3e-3)
    for b, (n, dl) in enumerate(rows):
        if n == 0 and dl == 0:
            assert (out[b] == 0).all()


@pytest.mark.parametrize(
    "seed,rows,kvh,group,d",
    [
        (51, [(2, 63), (0, 0), (0, 1), (3, 0)], 2, 4, 64),
        (52, [(1, 17), (4, 63)], 1, 8, 128),
    ],
)
def test_fp8_reference_matches_f64(seed, rows, kvh, group, d):
    args, (kd, vd) = make_fp8(seed, rows, kvh, group, d, torch.float32)
    args = _cpu(args)
    ref = fp8_decode_attention_ref(**args)
    want = attention_f64(args, kd, vd)
    assert torch.isfinite(ref).all()
    assert rel_err(ref.double(), want) < 1e-5


def test_quantization_sanity():
    """Attention over the quantized pages stays close to attention over the original K/V."""
    rows = [(3, 0), (2, 0)]
    for make, bits, min_cos in ((make_fp8, None, 0.995), (make_kivi, 4, 0.97)):
        gen, q, kp, vp, ids, _, _ = _layout(61, rows, 1, 4, 64, torch.float32)
        args, (kd, vd) = make(61, rows, 1, 4, 64, *([bits] if bits else []), torch.float32)
        want = attention_f64(_cpu(args), kd, vd)
        exact_kd, exact_vd = kd.clone(), vd.clone()
        exact_kd[ids], exact_vd[ids] = kp.double(), vp.double()
        exact = attention_f64(_cpu(args), exact_kd, exact_vd)
        cos = torch.nn.functional.cosine_similarity(want.flatten(), exact.flatten(), dim=0).item()
        assert cos > min_cos


# ---------------------------------------------------------------- shared behaviour


def test_all_padding_rows():
    kivi, _ = make_kivi(71, [(0, 0), (0, 0)], 1, 4, 64, 2, torch.float16)
    fp8, _ = make_fp8(71, [(0, 0), (0, 0)], 1, 4, 64, torch.float16)
    for splits in (1, 2):
        assert (kivi_decode_attention(**kivi, num_splits=splits) == 0).all()
        assert (fp8_decode_attention(**fp8, num_splits=splits) == 0).all()
    assert (kivi_decode_attention_ref(**kivi) == 0).all() and (
        fp8_decode_attention_ref(**fp8) == 0
    ).all()


def _common_bad(a):
    return {
        "q": dict(q=a["q"].to(torch.int32)),
        "num_heads": dict(q=a["q"][:, :3].contiguous()),
        "head_dim": dict(q=a["q"][..., :47].contiguous()),  # odd: no kernel takes it
        "page_table": dict(page_table=a["page_table"].long()),
        "n_pages": dict(n_pages=a["n_pages"].long()),
        "dense_lens": dict(dense_lens=a["dense_lens"][:1]),
        "dense_k": dict(dense_k=a["dense_k"].float()),
        "dense_v": dict(dense_v=a["dense_v"][:, :, :2]),
        "num_splits": dict(num_splits=0),
        "scale": dict(scale=torch.tensor(0.1)),
        "out": dict(out=torch.empty(2, 4, 64, dtype=torch.float32, device=DEVICE)),
        "contiguous": dict(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
    }


def test_kivi_wrapper_errors():
    a, _ = make_kivi(81, [(1, 9), (2, 0)], 2, 2, 64, 2, torch.float16)
    bad = _common_bad(a)
    bad.update(
        {
            "bits": dict(bits=3),
            "k_codes": dict(k_codes=a["k_codes"].to(torch.int8)),
            "v_codes": dict(v_codes=a["v_codes"][:, :, :32]),
            "k_scale": dict(k_scale=a["k_scale"].float()),
            "k_min": dict(k_min=a["k_min"][:, :, :1]),
            "v_scale": dict(v_scale=a["v_scale"][:, :, :32]),
            "v_min": dict(v_min=a["v_min"].float()),
        }
    )
    bad["k_codes and bits"] = dict(bits=4)  # 4-bit codes would need D / 2 bytes per row
    for fn in (kivi_decode_attention, kivi_decode_attention_ref):
        for name, kw in bad.items():
            with pytest.raises(ValueError, match=name.split()[0]):
                fn(**{**a, **kw})


def test_fp8_wrapper_errors():
    a, _ = make_fp8(82, [(1, 9), (2, 0)], 2, 2, 64, torch.float16)
    bad = _common_bad(a)
    bad.update(
        {
            "k ": dict(k=a["k"].to(torch.float16)),
            "v ": dict(v=a["v"][:, :, :32]),
            "k_scale": dict(k_scale=a["k_scale"].half()),
            "v_scale": dict(v_scale=a["v_scale"][:1]),
        }
    )
    for fn in (fp8_decode_attention, fp8_decode_attention_ref):
        for name, kw in bad.items():
            with pytest.raises(ValueError, match=name):
                fn(**{**a, **kw})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_without_interpreter_raises():
    code = (
        "import torch\n"
        "from zipserve.kernels.kivi_decode_attention import kivi_decode_attention as kv\n"
        "from zipserve.kernels.fp8_decode_attention import fp8_decode_attention as f8\n"
        "q = torch.zeros(1, 2, 64); d = torch.zeros(1, 1, 4, 64); i = torch.zeros(1, dtype=torch.int32)\n"
        "c = torch.zeros(1, 1, 64, 16, dtype=torch.uint8); h = torch.zeros(1, 1, 2, 64, dtype=torch.half)\n"
        "g = torch.zeros(1, 1, 64, 2, dtype=torch.half); s = torch.ones(1, 1)\n"
        "e = torch.zeros(1, 1, 64, 64, dtype=torch.float8_e4m3fn)\n"
        "for f, a in ((kv, (q, c, h, h, c, g, g, i[None], i, d, d, i, 0.125, 2)),\n"
        "             (f8, (q, e, s, e, s, i[None], i, d, d, i, 0.125))):\n"
        "    try:\n        f(*a)\n    except RuntimeError as err:\n        print('RAISED', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RAISED")]
    assert len(lines) == 2 and all("TRITON_INTERPRET" in ln and "_ref" in ln for ln in lines), (
        res.stderr
    )


# ---------------------------------------------------------------- GPU (skipped without CUDA)


def _realistic_rows(seed, B=8, max_pages=32):
    gen = torch.Generator().manual_seed(seed)
    rows = [
        (int(n), int(dl))
        for n, dl in zip(
            torch.randint(0, max_pages + 1, (B,), generator=gen),
            torch.randint(0, P, (B,), generator=gen),
        )
    ]
    rows[0], rows[1], rows[2] = (0, 0), (max_pages, 63), (max_pages, 0)
    return rows


def _f32(args):
    return {**args, **{n: args[n].float() for n in ("q", "dense_k", "dense_v")}}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,splits", [(2, 1), (4, 4), (2, 8)])
def test_kivi_bf16_realistic_gpu(bits, splits):
    args, (kd, vd) = make_kivi(91, _realistic_rows(91), 8, 4, 128, bits, torch.bfloat16)
    ref = kivi_decode_attention_ref(**_f32(args))
    out = kivi_decode_attention(**args, num_splits=splits)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < 2e-2
    assert rel_err(out.double().cpu(), attention_f64(_f32(args), kd, vd)) < 2e-2
    assert (out[0] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d,splits", [(128, 1), (128, 4), (64, 8)])
def test_fp8_bf16_realistic_gpu(d, splits):
    args, (kd, vd) = make_fp8(92, _realistic_rows(92), 8, 4, d, torch.bfloat16)
    ref = fp8_decode_attention_ref(**_f32(args))
    out = fp8_decode_attention(**args, num_splits=splits)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < 2e-2
    assert rel_err(out.double().cpu(), attention_f64(_f32(args), kd, vd)) < 2e-2
    assert (out[0] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["kivi", "fp8"])
def test_cuda_graph_replay_gpu(kind):
    """Capture once with num_splits=4, then change the lengths in place and replay."""
    rows = _realistic_rows(93)
    if kind == "kivi":
        args, _ = make_kivi(93, rows, 8, 4, 128, 2, torch.bfloat16)
        fn, ref_fn = kivi_decode_attention, kivi_decode_attention_ref
    else:
        args, _ = make_fp8(93, rows, 8, 4, 128, torch.bfloat16)
        fn, ref_fn = fp8_decode_attention, fp8_decode_attention_ref
    out = torch.empty_like(args["q"])
    fn(**args, num_splits=4, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(**args, num_splits=4, out=out)
    args["n_pages"].copy_(torch.div(args["n_pages"], 2, rounding_mode="floor"))
    args["dense_lens"].copy_(torch.clamp(args["dense_lens"], max=5))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ref_fn(**_f32(args))) < 2e-2
