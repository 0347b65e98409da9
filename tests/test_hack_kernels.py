"""Tests for the HACK 2/4-bit KV pages: layout helpers, encode kernel, decode attention kernel.

Triton kernels run under TRITON_INTERPRET=1 on CPU (fp16 / fp32 only: bf16 dots are wrong there).
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

from zipserve.kernels.hack_decode_attention import (  # noqa: E402
    hack_decode_attention,
    hack_decode_attention_ref,
    hack_num_splits,
)
from zipserve.kernels.hack_encode import (  # noqa: E402
    hack_dequantize_ref,
    hack_encode_pages,
    hack_encode_pages_ref,
)
from zipserve.kernels.hack_layout import HackPages, hack_bytes_per_token, pack_planar, unpack_planar  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = 64


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


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_planar(bits):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=gen, dtype=torch.uint8)
    packed = pack_planar(codes, bits)
    e, de = 8 // bits, 64 // (8 // bits)
    assert packed.shape == (3, 5, de) and packed.dtype == torch.uint8
    assert torch.equal(unpack_planar(packed, bits), codes)
    j, s = 3, e - 1  # byte j holds channel j + s * DE at bit offset s * bits
    assert torch.equal((packed[..., j] >> (s * bits)) & ((1 << bits) - 1), codes[..., j + s * de])


def test_bytes_per_token():
    assert hack_bytes_per_token(128, 2, include_sums=False) == 80
    assert hack_bytes_per_token(128, 2) == 92
    assert hack_bytes_per_token(128, 4, include_sums=False) == 144
    pool = HackPages.empty(3, 2, P, 128, 2)
    assert pool.nbytes() == 92 * 3 * 2 * P
    with pytest.raises(ValueError, match="bits"):
        hack_bytes_per_token(128, 3)


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize(
    "bits,d,gv,dtype",
    [
        (2, 64, 64, torch.float16),
        (4, 64, 32, torch.float32),
        (2, 128, 64, torch.float32),
        (4, 128, 64, torch.float16),
    ],
)
def test_encode_kernel_matches_reference(bits, d, gv, dtype):
    gen = torch.Generator().manual_seed(bits * d + gv)
    n, kvh = 3, 2
    k = rand_kv(gen, (n, kvh, P, d)).to(dtype)
    v = rand_kv(gen, (n, kvh, P, d), outliers=False).to(dtype)
    k[1, 0, :, 7] = 0.75  # zero-range K channel
    v[2, 1, 5, :gv] = -1.25  # zero-range V group
    ids = torch.tensor([4, 0, 2], dtype=torch.int32)
    pools = []
    for fn in (hack_encode_pages, hack_encode_pages_ref):
        pool = HackPages.empty(6, kvh, P, d, bits, gv)
        for t in pool.tensors().values():
            t.fill_(7)  # untouched pages must stay untouched
        res = fn(
            k.to(DEVICE), v.to(DEVICE), bits, gv, out=_to(pool, DEVICE), page_ids=ids.to(DEVICE)
        )
        pools.append(_to(res, "cpu"))
    a, b = pools
    for name in ("k_codes", "v_codes"):
        ca, cb = (
            unpack_planar(getattr(a, name), bits).int(),
            unpack_planar(getattr(b, name), bits).int(),
        )
        assert (ca - cb).abs().max() <= 1
        assert (ca != cb).float().mean() < 1e-3  # rounding ties only (fp32 division on GPU)
    for name in ("k_scale", "k_min", "v_scale", "v_min", "k_sums", "v_sums"):
        assert torch.allclose(
            getattr(a, name).float(), getattr(b, name).float(), rtol=1e-3, atol=1e-3
        ), name
    for t in a.tensors().values():
        assert (t[[1, 3, 5]] == 7).all()
    # sums are the code sums
    kq = unpack_planar(a.k_codes[ids.long()], bits).float()
    vq = unpack_planar(a.v_codes[ids.long()], bits).float()
    assert torch.equal(a.k_sums[ids.long()], kq.sum(-1))
    assert torch.equal(a.v_sums[ids.long()], vq.sum(-2))
    # dequantization error <= scale / 2 (+ float16 rounding of scale / min) within the stored
    # range [min, min + qmax * scale]; values past it (2 bits: the range clip) saturate
    kd, vd = hack_dequantize_ref(a)
    kd, vd = kd[ids.long()], vd[ids.long()]
    kf, vf = k.float(), v.float()
    qmax = (1 << bits) - 1
    ks = a.k_scale[ids.long()].float()[:, :, None, :]
    km = a.k_min[ids.long()].float()[:, :, None, :]
    vs = a.v_scale[ids.long()].float().repeat_interleave(gv, dim=-1)
    vm = a.v_min[ids.long()].float().repeat_interleave(gv, dim=-1)
    kc = torch.minimum(torch.maximum(kf, km), km + qmax * ks)
    vc = torch.minimum(torch.maximum(vf, vm), vm + qmax * vs)
    slack = 2e-3 * kf.abs().amax()
    assert ((kd - kc).abs() <= ks / 2 + slack).all()
    assert ((vd - vc).abs() <= vs / 2 + 2e-3 * vf.abs().amax()).all()
    # the stored range is [min, max] shrunk by at most 20% (2 bits: the range clip, 0.1 a side)
    for x, lo, sc, dim in ((kf, km, ks, 2), (vf.unflatten(-1, (-1, gv)), None, None, -1)):
        if lo is None:
            lo = a.v_min[ids.long()].float()[..., None]
            sc = a.v_scale[ids.long()].float()[..., None]
        r = x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)
        tol = 2e-3 * x.abs().amax()
        assert (lo >= x.amin(dim, keepdim=True) - tol).all()
        assert (lo + qmax * sc <= x.amax(dim, keepdim=True) + tol).all()
        assert (qmax * sc >= 0.8 * r - tol).all()
    assert (a.k_scale[0, 0, 7] == 0) and (kd[1, 0, :, 7] == 0.75).all()
    assert (vd[2, 1, 5, :gv] == -1.25).all()
    assert (ks > 0).float().mean() > 0.99


def test_encode_new_pool_and_errors():
    gen = torch.Generator().manual_seed(5)
    k = rand_kv(gen, (2, 1, P, 64)).half().to(DEVICE)
    v = rand_kv(gen, (2, 1, P, 64)).half().to(DEVICE)
    pool = hack_encode_pages(k, v, 4)
    ref = hack_encode_pages_ref(k, v, 4)
    assert pool.num_pages == 2 and pool.bits == 4 and pool.k_codes.shape == (2, 1, P, 32)
    assert (
        unpack_planar(pool.k_codes, 4).int() - unpack_planar(ref.k_codes, 4).int()
    ).abs().max() <= 1
    assert torch.allclose(pool.v_scale.float(), ref.v_scale.float(), rtol=1e-3, atol=1e-4)
    for fn in (hack_encode_pages, hack_encode_pages_ref):
        with pytest.raises(ValueError, match="bits"):
            fn(k, v, 3)
        with pytest.raises(ValueError, match="group_v"):
            fn(k, v, 2, group_v=48)
        with pytest.raises(ValueError, match="v shape"):
            fn(k, v[:1], 2)
        with pytest.raises(ValueError, match="page_ids"):
            fn(k, v, 4, out=pool)
        with pytest.raises(ValueError, match="out"):
            fn(k, v, 2, out=pool, page_ids=torch.zeros(2, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("bits", [2, 4])
def test_encode_with_fused_rotation(bits):
    """The fused rotation stores the pages of k @ R, v @ R: kernel == reference, and both equal
    encoding pre-rotated inputs."""
    from zipserve.compress.rotation import hadamard

    gen = torch.Generator().manual_seed(11 + bits)
    d, gv = 64, 32
    k = rand_kv(gen, (3, 2, P, d)).half()
    v = rand_kv(gen, (3, 2, P, d), outliers=False).half()
    r = hadamard(d).to(DEVICE)
    fused = hack_encode_pages(k.to(DEVICE), v.to(DEVICE), bits, gv, rotation=r)
    ref = hack_encode_pages_ref(k.to(DEVICE), v.to(DEVICE), bits, gv, rotation=r)
    pre = hack_encode_pages_ref(k.float().to(DEVICE) @ r, v.float().to(DEVICE) @ r, bits, gv)
    for a, b, tol in ((fused, ref, 1e-2), (ref, pre, 1e-9)):
        for name in ("k_codes", "v_codes"):
            ca = unpack_planar(getattr(a, name), bits).int()
            cb = unpack_planar(getattr(b, name), bits).int()
            assert (ca - cb).abs().max() <= 1 and (ca != cb).float().mean() <= tol
        for name in ("k_scale", "k_min", "v_scale", "v_min"):
            assert torch.allclose(
                getattr(a, name).float(), getattr(b, name).float(), rtol=1e-2, atol=1e-3
            ), name
    with pytest.raises(ValueError, match="rotation"):
        hack_encode_pages_ref(k, v, bits, gv, rotation=r[:8].cpu())


# ---------------------------------------------------------------- decode


def _to(pages, device):
    return HackPages(
        **{n: t.to(device) for n, t in pages.tensors().items()},
        bits=pages.bits,
        group_v=pages.group_v,
    )


def make_case(seed, lens, kvh, group, d, bits, dtype, n_sink=4, group_v=64, extra_pages=2):
    """Random sequences -> (kernel kwargs, float64 expectations input).

    Full pages are encoded into a pool at shuffled ids; unused pool pages hold NaN scales / sums and
    the dense buffer's unused slots hold NaN, so stray reads show up.  page_table entries past a
    sequence's pages are -1.
    """
    gen = torch.Generator().manual_seed(seed)
    B, H, L = len(lens), kvh * group, max(max(lens), 1)
    q = torch.randn(B, H, d, generator=gen).to(dtype)
    k = rand_kv(gen, (B, kvh, L, d)).to(dtype)
    v = rand_kv(gen, (B, kvh, L, d), outliers=False).to(dtype)
    n_full = [n // P for n in lens]
    num_pages = sum(n_full) + extra_pages
    perm = torch.randperm(num_pages, generator=gen)
    page_table = torch.full((B, max(max(n_full), 1) + 1), -1, dtype=torch.int32)
    kp, vp, ids = [], [], []
    dense_idx = []
    for b, n in enumerate(lens):
        for i in range(n_full[b]):
            page_table[b, i] = perm[len(ids)]
            ids.append(int(perm[len(ids)]))
            kp.append(k[b, :, i * P : (i + 1) * P])
            vp.append(v[b, :, i * P : (i + 1) * P])
        nf = n_full[b]
        dense_idx.append(
            list(range(min(n_sink, n))) + list(range(nf * P, n)) if nf else list(range(n))
        )
    pool = HackPages.empty(num_pages, kvh, P, d, bits, group_v)
    for name in ("k_scale", "k_min", "v_scale", "v_min", "k_sums", "v_sums"):
        getattr(pool, name).fill_(float("nan"))
    pool.k_codes.random_(0, 256, generator=gen)
    pool.v_codes.random_(0, 256, generator=gen)
    if ids:
        hack_encode_pages_ref(
            torch.stack(kp),
            torch.stack(vp),
            bits,
            group_v,
            out=pool,
            page_ids=torch.tensor(ids, dtype=torch.int32),
        )
    T = max(len(x) for x in dense_idx) + 3
    dense_k = torch.full((B, kvh, T, d), float("nan"), dtype=dtype)
    dense_v = torch.full((B, kvh, T, d), float("nan"), dtype=dtype)
    for b, idx in enumerate(dense_idx):
        dense_k[b, :, : len(idx)] = k[b, :, idx]
        dense_v[b, :, : len(idx)] = v[b, :, idx]
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    args = dict(
        q=q.to(DEVICE),
        pages=_to(pool, DEVICE),
        page_table=page_table.to(DEVICE),
        n_pages=i32(n_full),
        dense_k=dense_k.to(DEVICE),
        dense_v=dense_v.to(DEVICE),
        dense_lens=i32([len(x) for x in dense_idx]),
        scale=d**-0.5,
        bits=bits,
        n_sink=n_sink,
    )
    return args, (k, v, dense_idx)


def attention_f64(args, k, v, dense_idx):
    """Plain float64 attention over dequantized quantized-page tokens (pos >= n_sink) + exact dense tokens."""
    pool = _to(args["pages"], "cpu")
    kd, vd = hack_dequantize_ref(pool)
    q = args["q"].cpu().double()
    B, H, D = q.shape
    kvh, n_sink = pool.num_kv_heads, args["n_sink"]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        npg, dl = int(args["n_pages"][b]), int(args["dense_lens"][b])
        ids = args["page_table"][b, :npg].long().cpu()
        kk = kd[ids].transpose(0, 1).reshape(kvh, -1, D)[:, n_sink if npg else 0 :].double()
        vv = vd[ids].transpose(0, 1).reshape(kvh, -1, D)[:, n_sink if npg else 0 :].double()
        kk = torch.cat([kk, args["dense_k"][b, :, :dl].cpu().double()], 1)
        vv = torch.cat([vv, args["dense_v"][b, :, :dl].cpu().double()], 1)
        if kk.shape[1] == 0:
            continue
        kk, vv = kk.repeat_interleave(H // kvh, 0), vv.repeat_interleave(H // kvh, 0)
        s = torch.einsum("hd,hnd->hn", q[b], kk) * args["scale"]
        out[b] = torch.einsum("hn,hnd->hd", s.softmax(-1), vv)
    return out


# (seed, lens, kvh, group, d, bits, splits, dtype); lens % 64 covers {0, 1, 63}, short and padding rows.
CASES = [
    (1, [128, 65, 191], 2, 1, 64, 2, 1, torch.float32),
    (2, [128, 65, 191], 1, 4, 128, 4, 2, torch.float32),
    (3, [256, 40, 0], 1, 8, 128, 2, 3, torch.float16),
    (4, [200, 63, 1], 2, 4, 64, 4, 8, torch.float16),
    (5, [320, 129], 1, 8, 64, 2, 2, torch.float32),
    (6, [577, 3], 1, 4, 128, 2, 1, torch.float32),
    (7, [130, 0, 64], 1, 1, 128, 4, 4, torch.float16),
]


@pytest.mark.parametrize("mode", ["f16", "int8"])
@pytest.mark.parametrize("seed,lens,kvh,group,d,bits,splits,dtype", CASES)
def test_decode_kernel_matches_reference(mode, seed, lens, kvh, group, d, bits, splits, dtype):
    args, _ = make_case(seed, lens, kvh, group, d, bits, dtype)
    ref = hack_decode_attention_ref(**args, mode=mode)
    out = hack_decode_attention(**args, mode=mode, num_splits=splits)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    tol = {("f16", torch.float32): 5e-3, ("int8", torch.float32): 2e-3}.get((mode, dtype), 1e-2)
    assert rel_err(out, ref) < tol
    for b, n in enumerate(lens):
        if n == 0:
            assert (out[b] == 0).all()


@pytest.mark.parametrize("mode,tol", [("f16", 1e-5), ("int8", 3e-2)])
@pytest.mark.parametrize(
    "seed,lens,kvh,group,d,bits,n_sink",
    [
        (21, [128, 65, 191, 0, 30], 2, 4, 64, 2, 4),
        (22, [64, 127, 300], 1, 8, 128, 4, 4),
        (23, [257, 70], 2, 1, 128, 2, 0),
    ],
)
def test_reference_matches_f64_attention(mode, tol, seed, lens, kvh, group, d, bits, n_sink):
    args, (k, v, dense_idx) = make_case(
        seed, lens, kvh, group, d, bits, torch.float32, n_sink=n_sink
    )
    args = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    args["pages"] = _to(args["pages"], "cpu")
    ref = hack_decode_attention_ref(**args, mode=mode)
    want = attention_f64(args, k, v, dense_idx)
    assert torch.isfinite(ref).all()
    assert rel_err(ref.double(), want) < tol
    # and the quantization itself is sane: near attention over the original K/V (random data is a
    # worst case for 2-bit; real K/V have far more structure)
    exact = torch.zeros_like(want)
    q = args["q"].double()
    for b, n in enumerate(lens):
        if n:
            kk = k[b, :, :n].double().repeat_interleave(group, 0)
            vv = v[b, :, :n].double().repeat_interleave(group, 0)
            exact[b] = torch.einsum(
                "hn,hnd->hd", (torch.einsum("hd,hnd->hn", q[b], kk) * args["scale"]).softmax(-1), vv
            )
    cos = torch.nn.functional.cosine_similarity(want.flatten(), exact.flatten(), dim=0).item()
    assert cos > (0.75 if bits == 2 else 0.97)


@pytest.mark.parametrize("gv,bits,mode", [(32, 2, "int8"), (32, 2, "f16"), (128, 4, "int8")])
def test_decode_group_sizes(gv, bits, mode):
    args, data = make_case(35, [191, 64, 20], 1, 4, 128, bits, torch.float32, group_v=gv)
    ref = hack_decode_attention_ref(**args, mode=mode)
    out = hack_decode_attention(**args, mode=mode, num_splits=2)
    assert rel_err(out, ref) < (5e-3 if mode == "f16" else 2e-3)
    cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    cpu["pages"] = _to(args["pages"], "cpu")
    assert rel_err(ref.double().cpu(), attention_f64(cpu, *data)) < (
        1e-5 if mode == "f16" else 3e-2
    )


def test_decode_rejects_group_smaller_than_plane():
    args, _ = make_case(36, [70], 1, 2, 128, 4, torch.float16, group_v=32)  # plane = 64 channels
    with pytest.raises(ValueError, match="group_v"):
        hack_decode_attention(**args)


def test_kernel_no_sinks_out_and_splits_agree():
    args, _ = make_case(31, [200, 70, 64], 1, 4, 64, 2, torch.float32, n_sink=0)
    ref = hack_decode_attention_ref(**args)
    out = torch.full_like(args["q"], float("nan"))
    res = hack_decode_attention(**args, num_splits=3, out=out)
    assert res is out and rel_err(out, ref) < 5e-3
    one = hack_decode_attention(**args, num_splits=1)
    assert rel_err(one, out) < 1e-3  # fp16 p~ is rounded relative to a split-dependent running max


def test_all_padding_rows():
    args, _ = make_case(32, [0, 0], 1, 4, 64, 4, torch.float16)
    for mode in ("f16", "int8"):
        for splits in (1, 2):
            assert (hack_decode_attention(**args, num_splits=splits, mode=mode) == 0).all()


def test_wrapper_errors():
    args, _ = make_case(33, [70, 9], 2, 2, 64, 2, torch.float16)
    a = args
    bad = {
        "q": dict(q=a["q"].to(torch.int32)),
        "num_heads": dict(q=a["q"][:, :3].contiguous()),
        "head_dim": dict(q=a["q"][..., :32].contiguous()),
        "page_table": dict(page_table=a["page_table"].long()),
        "n_pages": dict(n_pages=a["n_pages"].long()),
        "dense_lens": dict(dense_lens=a["dense_lens"][:1]),
        "dense_k": dict(dense_k=a["dense_k"].float()),
        "dense_v": dict(dense_v=a["dense_v"][:, :, :2]),
        "bits": dict(bits=4),
        "n_sink": dict(n_sink=-1),
        "num_splits": dict(num_splits=0),
        "mode": dict(mode="fp8"),
        "scale": dict(scale=torch.tensor(0.1)),
        "out": dict(out=torch.empty(2, 4, 64, dtype=torch.float32, device=DEVICE)),
        "contiguous": dict(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
        "pages": dict(
            pages=HackPages(
                **{**a["pages"].tensors(), "k_min": a["pages"].k_min.float()}, bits=2, group_v=64
            )
        ),
    }
    for fn in (hack_decode_attention, hack_decode_attention_ref):
        for name, kw in bad.items():
            with pytest.raises(ValueError, match=name):
                fn(**{**a, **kw})


def test_num_splits_heuristic():
    assert hack_num_splits(128, 8, 4096) == 1
    assert hack_num_splits(8, 8, 32768) > 2
    assert hack_num_splits(1, 8, 500) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_without_interpreter_raises():
    code = (
        "import torch\n"
        "from zipserve.kernels.hack_decode_attention import hack_decode_attention as f\n"
        "from zipserve.kernels.hack_layout import HackPages\n"
        "pg = HackPages.empty(1, 1, 64, 64, 2)\n"
        "q = torch.zeros(1, 2, 64); d = torch.zeros(1, 1, 4, 64); i = torch.zeros(1, dtype=torch.int32)\n"
        "try:\n    f(q, pg, i[None], i, d, d, i, 0.125, 2)\n"
        "except RuntimeError as e:\n    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "RAISED" in res.stdout and "TRITON_INTERPRET" in res.stdout, res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode,bits,splits", [("f16", 2, 1), ("f16", 4, 4), ("int8", 2, 4)])
def test_bf16_realistic_gpu(mode, bits, splits):
    torch.manual_seed(0)
    lens = torch.randint(1, 2048, (8,)).tolist()
    lens[0], lens[1], lens[2] = 0, 2048, 2047
    args, data = make_case(41, lens, 8, 4, 128, bits, torch.bfloat16)
    ref = hack_decode_attention_ref(
        **{
            **args,
            "q": args["q"].float(),
            "dense_k": args["dense_k"].float(),
            "dense_v": args["dense_v"].float(),
        },
        mode=mode,
    )
    out = hack_decode_attention(**args, mode=mode, num_splits=splits)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < 2e-2
    cpu = {n: (t.cpu().float() if n in ("q", "dense_k", "dense_v") else t) for n, t in args.items()}
    cpu["pages"] = _to(args["pages"], "cpu")
    want = attention_f64(cpu, *data)
    assert rel_err(out.double().cpu(), want) < (2e-2 if mode == "f16" else 4e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
def test_encode_bf16_gpu(bits):
    gen = torch.Generator().manual_seed(bits)
    k = rand_kv(gen, (64, 8, P, 128)).bfloat16().cuda()
    v = rand_kv(gen, (64, 8, P, 128)).bfloat16().cuda()
    a, b = hack_encode_pages(k, v, bits), hack_encode_pages_ref(k, v, bits)
    torch.cuda.synchronize()
    for name in ("k_codes", "v_codes"):
        ca, cb = (
            unpack_planar(getattr(a, name), bits).int(),
            unpack_planar(getattr(b, name), bits).int(),
        )
        assert (ca - cb).abs().max() <= 1 and (ca != cb).float().mean() < 1e-3
    for name in ("k_scale", "k_min", "v_scale", "v_min"):
        assert torch.allclose(
            getattr(a, name).float(), getattr(b, name).float(), rtol=1e-3, atol=1e-3
        ), name


def test_triton_splits_fill_a_wave_of_the_programs_an_sm_holds():
    """4-warp programs (planes of >= 32 bytes): 2 resident per SM, so 8 x 8k at 8 KV heads takes
    264 // 64 = 4 splits, never one under 1024 tokens; 1-warp programs (head_dim 64 at 2 bits:
    lowrank+hack2's pages) 8 per SM, so 16 splits, none under 512 tokens."""
    assert hack_num_splits(8, 8, 8192, 132) == 4
    assert hack_num_splits(8, 8, 8192, 132, bits=4, head_dim=64) == 4
    assert hack_num_splits(8, 8, 2048, 132) == 2  # 1024 tokens per split
    assert hack_num_splits(8, 8, 8192, 132, bits=2, head_dim=64) == 16
    assert hack_num_splits(8, 8, 4096, 132, bits=2, head_dim=64) == 8  # 512 tokens per split
    assert hack_num_splits(32, 8, 8192, 132, bits=2, head_dim=64) == 4
    assert hack_num_splits(64, 8, 8192, 132, bits=2, head_dim=64) == 2
    assert hack_num_splits(128, 8, 8192, 132, bits=2, head_dim=64) == 1


@pytest.mark.parametrize("butterfly", [True, False])
@pytest.mark.parametrize("d,group,dtype", [(128, 4, torch.bfloat16), (64, 8, torch.float16)])
def test_tail_programs_write_the_rotated_query(d, group, dtype, butterfly):
    """With the CUDA kernel taking the page splits, the Triton launch's tail programs also write
    the pages' query q R (fp32) for it: equal to torch's fp32 q @ R, and the tail's partial is the
    one a launch without the rotation writes (R as hadamard()'s tensor: the butterfly; else a dot)."""
    from zipserve.compress.rotation import hadamard
    from zipserve.kernels import hack_decode_attention as hd
    from zipserve.kernels.paged_decode_attention import split_buffers

    args, _ = make_case(11, [200, 70, 5], 2, group, d, 2, dtype)
    q = args["q"]
    B, H, _ = q.shape
    # hadamard()'s own tensor: the butterfly; a copy: the dot with R
    r = hadamard(d, q.device) if butterfly else hadamard(d, q.device).clone()  # [D, D] fp32
    rows, start = hd.tail_index(q, None, None)
    got = {}
    for rotation in (None, r):
        q_pages = torch.full((B, H, d), float("nan"), device=q.device)
        part, lse = split_buffers(q, torch.empty_like(q), 3)
        hd._launch_triton(
            q_pages if rotation is not None else q.float().contiguous(),
            q,
            args["pages"],
            args["page_table"],
            args["n_pages"],
            args["dense_k"],
            args["dense_v"],
            args["dense_lens"],
            rows,
            start,
            part,
            lse,
            args["scale"],
            args["n_sink"],
            2,
            "f16",
            programs=1,
            rotation=rotation,
        )
        got[rotation is None] = (q_pages, part[:, :, 0].clone(), lse[:, :, 0].clone())
    q_rot, part_rot, lse_rot = got[False]
    want = q.float() @ r
    assert rel_err(q_rot, want) < 1e-6
    assert torch.equal(part_rot, got[True][1]) and torch.equal(lse_rot, got[True][2])
