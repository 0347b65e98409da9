"""Head sizes that are not powers of two (and 8, below tl.dot's 16): every Triton kernel against its
torch reference at head_dim 8, 80 and 96 (KIVI / HACK at 96, and HACK 2-bit at 32, whose 8-channel
planes are padded too), in the interpreter on CPU (fp16 / fp32) and in bf16 on a GPU (`-m gpu`).

The cases reuse the kernel test modules' builders (NaN in every unused cache slot, so a stray read
of a padded channel or page shows up).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402
import test_baseline_kernels as base  # noqa: E402
import test_hack_kernels as hk  # noqa: E402
import test_prefill_baseline_kernels as bpre  # noqa: E402
import test_prefill_compressed_kernels as hpre  # noqa: E402
from test_dequant_pages import _encoded, _run  # noqa: E402
from test_lowrank_fold import _decode_case  # noqa: E402
from test_paged_decode_attention import make_case as paged_case  # noqa: E402

from zipserve.compress.codecs import CODECS, check_head_dim, make_codec  # noqa: E402
from zipserve.compress.rotation import hadamard  # noqa: E402
from zipserve.kernels import hack_encode as he  # noqa: E402
from zipserve.kernels.fp8_decode_attention import fp8_decode_attention, fp8_decode_attention_ref  # noqa: E402
from zipserve.kernels.hack_decode_attention import (  # noqa: E402
    hack_decode_attention,
    hack_decode_attention_ref,
)
from zipserve.kernels.hack_layout import HackPages, hack_group_v, unpack_planar  # noqa: E402
from zipserve.kernels.hack_prefill_attention import (  # noqa: E402
    hack_prefill_attention,
    hack_prefill_attention_ref,
)
from zipserve.kernels.kivi_decode_attention import (  # noqa: E402
    kivi_decode_attention,
    kivi_decode_attention_ref,
)
from zipserve.kernels.lowrank_decode_attention import (  # noqa: E402
    lowrank_decode_attention,
    lowrank_decode_attention_ref,
)
from zipserve.kernels.lowrank_encode import lowrank_encode_pages, lowrank_encode_pages_ref  # noqa: E402
from zipserve.kernels.paged_decode_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_ref,
)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [8, 80, 96]
GROUPED = [96]  # KIVI / HACK sizes among them: multiples of their 32-channel group


def rel_err(out, ref):
    return (
        (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
    ).item()


def _f32(args, names=("q", "dense_k", "dense_v")):
    return {n: (t.float() if n in names else t) for n, t in args.items()}


# -- bf16 pages: paged decode ---------------------------------------------------------------------


@pytest.mark.parametrize("d", SIZES + [100])
@pytest.mark.parametrize("splits,dtype", [(1, torch.float32), (3, torch.float16)])
def test_paged_decode(d, splits, dtype):
    args, _ = paged_case(d, [17, 40, 0, 64], 2, 3, d, 16, dtype)
    ref = paged_decode_attention_ref(**args)
    out = paged_decode_attention(**args, num_splits=splits)
    assert out.shape == ref.shape == (4, 6, d) and torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 2e-2)
    assert (out[2] == 0).all()


# -- fp8 pages: decode and chunked prefill --------------------------------------------------------


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("splits,dtype", [(1, torch.float32), (3, torch.float16)])
def test_fp8_decode(d, splits, dtype):
    args, (kd, vd) = base.make_fp8(d, [(2, 63), (0, 1), (1, 0), (0, 0)], 2, 4, d, dtype)
    ref = fp8_decode_attention_ref(**args)
    out = fp8_decode_attention(**args, num_splits=splits)
    assert out.shape == (4, 8, d) and torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 3e-3)
    assert rel_err(ref.cpu().double(), base.attention_f64(base._cpu(_f32(args)), kd, vd)) < (
        1e-5 if dtype == torch.float32 else 3e-3
    )
    assert (out[3] == 0).all()


@pytest.mark.parametrize("fmt,d", [("fp8", d) for d in SIZES] + [("kivi2", 96), ("kivi4", 96)])
def test_baseline_prefill(fmt, d):
    _, _, kw = bpre.make_case(fmt, d, 64 + 33, 31, 1, 4, d, 32, torch.float32)
    kernel, ref_fn = bpre.FNS[fmt]
    out, ref = kernel(**kw), ref_fn(**kw)
    assert out.shape == (31, 4, d) and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4


# -- KIVI: decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("d", GROUPED)
@pytest.mark.parametrize("bits,splits,dtype", [(2, 1, torch.float32), (4, 3, torch.float16)])
def test_kivi_decode(d, bits, splits, dtype):
    args, (kd, vd) = base.make_kivi(d + bits, [(3, 10), (0, 0), (1, 63)], 2, 2, d, bits, dtype)
    ref = kivi_decode_attention_ref(**args)
    out = kivi_decode_attention(**args, num_splits=splits)
    assert out.shape == (3, 4, d) and torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 3e-3)
    assert (
        rel_err(
            kivi_decode_attention_ref(**base._cpu(_f32(args))).double(),
            base.attention_f64(base._cpu(_f32(args)), kd, vd),
        )
        < 1e-5
    )
    assert (out[1] == 0).all()


# -- HACK: encode, decode, chunked prefill --------------------------------------------------------

HACK_SIZES = [(96, 2), (96, 4), (32, 2)]  # 96: planes of 24 / 48 channels; 32 at 2 bits: of 8


@pytest.mark.parametrize("d,bits", HACK_SIZES)
@pytest.mark.parametrize("rotate", [False, True])
def test_hack_encode(d, bits, rotate):
    gen = torch.Generator().manual_seed(d + bits)
    gv = hack_group_v(d, bits)
    k = hk.rand_kv(gen, (3, 2, hk.P, d)).to(DEVICE)
    v = hk.rand_kv(gen, (3, 2, hk.P, d), outliers=False).to(DEVICE)
    k[1, 0, :, 7] = 0.75  # a zero-range K channel
    rot = hadamard(d, DEVICE) if rotate else None
    ids = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
    pools = []
    for fn in (he.hack_encode_pages, he.hack_encode_pages_ref):
        pool = HackPages.empty(6, 2, hk.P, d, bits, gv, device=DEVICE)
        for t in pool.tensors().values():
            t.fill_(7)  # untouched pages must stay untouched
        pools.append(hk._to(fn(k, v, bits, gv, out=pool, page_ids=ids, rotation=rot), "cpu"))
    a, b = pools
    for name in ("k_codes", "v_codes"):
        ca, cb = (
            unpack_planar(getattr(a, name), bits).int(),
            unpack_planar(getattr(b, name), bits).int(),
        )
        assert (ca - cb).abs().max() <= 1 and (ca != cb).float().mean() < 1e-2, name
    for name in ("k_scale", "k_min", "v_scale", "v_min", "k_sums", "v_sums"):
        assert torch.allclose(
            getattr(a, name).float(), getattr(b, name).float(), rtol=1e-2, atol=2e-2
        ), name
    for t in a.tensors().values():
        assert (t[[1, 3, 5]] == 7).all()
    if not rotate:
        assert (a.k_scale[0, 0, 7] == 0) and (a.k_min[0, 0, 7] == 0.75)


@pytest.mark.parametrize("d,bits", HACK_SIZES)
@pytest.mark.parametrize("mode", ["f16", "int8"])
def test_hack_decode(d, bits, mode):
    args, data = hk.make_case(
        d + bits, [128, 65, 0, 191], 1, 4, d, bits, torch.float32, group_v=hack_group_v(d, bits)
    )
    ref = hack_decode_attention_ref(**args, mode=mode)
    out = hack_decode_attention(**args, mode=mode, num_splits=2)
    assert out.shape == (4, 4, d) and torch.isfinite(out).all()
    assert rel_err(out, ref) < (5e-3 if mode == "f16" else 2e-3)
    assert (out[2] == 0).all()
    if mode == "f16":  # the reference is float64 attention over the dequantized pages
        cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
        cpu["pages"] = hk._to(args["pages"], "cpu")
        assert (
            rel_err(hack_decode_attention_ref(**cpu).double(), hk.attention_f64(cpu, *data)) < 1e-5
        )


@pytest.mark.parametrize("d,bits", HACK_SIZES)
@pytest.mark.parametrize("mode", ["f16", "int8"])
def test_hack_prefill(d, bits, mode):
    args, _ = hpre.make_case(d, 129, 33, 1, 4, d, bits, torch.float32, page=64)
    ref = hack_prefill_attention_ref(**args, mode=mode)
    out = hack_prefill_attention(**args, mode=mode)
    assert out.shape == (33, 4, d) and torch.isfinite(out).all()
    assert rel_err(out, ref) < (5e-3 if mode == "f16" else 2e-3)
    if mode == "f16":
        cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
        cpu["pages"] = hpre._to(args["pages"], "cpu")
        assert rel_err(hack_prefill_attention_ref(**cpu).double(), hpre.attention_f64(cpu)) < 1e-5


def test_block_hadamard_is_orthonormal_and_symmetric():
    for d in (96, 160, 80):
        r = hadamard(d).double()
        assert torch.allclose(r @ r, torch.eye(d, dtype=torch.float64), atol=1e-6)
        assert torch.equal(r, r.T)
    assert torch.equal(hadamard(64), hadamard(64).T)  # powers of two: one block, as before


# -- decode_kv=dense: dequantize on arrival -------------------------------------------------------


@pytest.mark.parametrize(
    "name,d", [("fp8", 8), ("fp8", 80), ("kivi2", 96), ("hack2", 96), ("hack4", 96), ("hack2", 32)]
)
def test_dequant_pages(name, d):
    codec, store = _encoded(name, 3, 2, d, d)
    ids = torch.tensor([5, 1, 3])
    got = [torch.full((7, 2, 64, d), 7.0) for _ in range(4)]
    _run(name, codec, store, ids, got[0], got[1], kernel=True)
    _run(name, codec, store, ids, got[2], got[3], kernel=False)
    assert rel_err(got[0][ids], got[2][ids]) < 1e-5 and rel_err(got[1][ids], got[3][ids]) < 1e-5
    want_k, want_v = codec.dequantize(store, torch.arange(3))
    assert rel_err(got[2][ids], want_k) < 1e-5 and rel_err(got[3][ids], want_v) < 1e-5
    for t in got:
        assert (t[[0, 2, 4, 6]] == 7.0).all()


# -- lowrank: its dense tail is full head_dim -----------------------------------------------------


@pytest.mark.parametrize("d", SIZES)
def test_lowrank_decode_and_encode(d):
    g = torch.Generator().manual_seed(d)
    rk, rv = min(d, 48), min(d, 32)
    args = _decode_case(g, 3, 4, 2, d, rk, rv, torch.float32, tails=[0, 17, 0], pages=[2, 3, 0])
    want = lowrank_decode_attention_ref(**args)
    for splits in (1, 3):
        got = lowrank_decode_attention(**args, num_splits=splits)
        assert rel_err(got[:2], want[:2]) < 1e-4 and (got[2] == 0).all()
    k, v = torch.randn(2, 2, 64, d, generator=g), torch.randn(2, 2, 64, d, generator=g)
    kb, vb = torch.randn(2, d, rk, generator=g), torch.randn(2, d, rv, generator=g)
    outs = []
    for fn in (lowrank_encode_pages, lowrank_encode_pages_ref):
        ok, ov = torch.zeros(3, 2, 64, rk), torch.zeros(3, 2, 64, rv)
        outs.append(fn(k, v, kb, vb, ok, ov, torch.tensor([2, 0])))
    assert rel_err(outs[0][0], outs[1][0]) < 1e-5 and rel_err(outs[0][1], outs[1][1]) < 1e-5


# -- which codec takes which head size ------------------------------------------------------------


@pytest.mark.parametrize("d", [8, 80, 96, 100, 128, 256])
def test_codecs_take_what_their_layout_allows(d):
    for name in CODECS:
        if name.startswith("lowrank") or name == "hack2mix":
            continue  # built from calibrated bases / bits (test_lowrank*.py, test_kvbits.py)
        grouped = name.startswith(("kivi", "hack"))
        if grouped and d % 32:
            with pytest.raises(
                ValueError,
                match=rf"head_dim: codec {name} needs head_dim a multiple "
                rf"of 32 .*\(got {d}\)",
            ):
                make_codec(name, 2, 64, d)
        else:
            codec = make_codec(name, 2, 64, d)
            assert codec.head_dim == d and codec.name == name
    for bad in (6, 7, 258, 512):
        with pytest.raises(
            ValueError,
            match=rf"head_dim: codec bf16 needs an even head_dim in "
            rf"\[8, 256\] \(got {bad}\)",
        ):
            check_head_dim("bf16", bad)


# -- GPU: bf16 at the same sizes ------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("d", SIZES + [100])
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_decode_bf16_gpu(d, splits):
    lens = [0, 2048, 1, 777, 64, 1500, 3, 1024]
    args, _ = paged_case(d, lens, 8, 4, d, 64, torch.bfloat16, device="cuda")
    ref = paged_decode_attention_ref(**_f32(args, ("q", "k_cache", "v_cache")))
    out = paged_decode_attention(**args, num_splits=splits)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all() and rel_err(out, ref) < 2e-2
    assert (out[0] == 0).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("splits", [1, 4])
def test_fp8_decode_bf16_gpu(d, splits):
    args, _ = base.make_fp8(d, base._realistic_rows(d), 8, 4, d, torch.bfloat16)
    out = fp8_decode_attention(**args, num_splits=splits)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, fp8_decode_attention_ref(**_f32(args))) < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("fmt,d", [("fp8", d) for d in SIZES] + [("kivi2", 96), ("kivi4", 96)])
def test_baseline_prefill_bf16_gpu(fmt, d):
    _, _, kw = bpre.make_case(fmt, d, 2048 + 36, 512, 8, 4, d, 64, torch.bfloat16, device="cuda")
    kernel, ref_fn = bpre.FNS[fmt]
    assert rel_err(kernel(**kw), ref_fn(**kw)) < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("bits,splits", [(2, 1), (4, 4)])
def test_kivi_decode_bf16_gpu(bits, splits):
    args, _ = base.make_kivi(96, base._realistic_rows(96), 8, 4, 96, bits, torch.bfloat16)
    out = kivi_decode_attention(**args, num_splits=splits)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, kivi_decode_attention_ref(**_f32(args))) < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("d,bits", HACK_SIZES)
@pytest.mark.parametrize("mode", ["f16", "int8"])
def test_hack_decode_and_prefill_bf16_gpu(d, bits, mode):
    lens = [0, 2048, 2047, 65, 1, 700, 1024, 300]
    args, _ = hk.make_case(d, lens, 8, 4, d, bits, torch.bfloat16, group_v=hack_group_v(d, bits))
    out = hack_decode_attention(**args, mode=mode, num_splits=4)
    ref = hack_decode_attention_ref(**_f32(args), mode=mode)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all() and rel_err(out, ref) < 2e-2
    pargs, _ = hpre.make_case(d, 1024 + 36, 512, 8, 4, d, bits, torch.bfloat16, device="cuda")
    pout = hack_prefill_attention(**pargs, mode=mode)
    pref = hack_prefill_attention_ref(
        **_f32(pargs, ("q", "k", "v", "dense_k", "dense_v")), mode=mode
    )
    assert rel_err(pout, pref) < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("d,bits", HACK_SIZES)
def test_hack_encode_bf16_gpu(d, bits):
    gen = torch.Generator().manual_seed(d)
    gv = hack_group_v(d, bits)
    k = hk.rand_kv(gen, (64, 8, hk.P, d)).bfloat16().cuda()
    v = hk.rand_kv(gen, (64, 8, hk.P, d)).bfloat16().cuda()
    r = hadamard(d, "cuda")
    a, b = (
        he.hack_encode_pages(k, v, bits, gv, rotation=r),
        he.hack_encode_pages_ref(k, v, bits, gv, rotation=r),
    )
    torch.cuda.synchronize()
    for name in ("k_codes", "v_codes"):
        ca, cb = (
            unpack_planar(getattr(a, name), bits).int(),
            unpack_planar(getattr(b, name), bits).int(),
        )
        assert (ca - cb).abs().max() <= 1 and (ca != cb).float().mean() < 1e-2
    for name in ("k_scale", "k_min", "v_scale", "v_min"):
        assert torch.allclose(
            getattr(a, name).float(), getattr(b, name).float(), rtol=1e-2, atol=1e-2
        ), name


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "name,d", [("fp8", 80), ("fp8", 8), ("kivi2", 96), ("hack2", 96), ("hack4", 96)]
)
def test_dequant_pages_bf16_gpu(name, d):
    codec, store = _encoded(name, 40, 8, d, 6, device="cuda")
    ids = torch.randperm(80, device="cuda")[:40]
    got_k = torch.zeros(80, 8, 64, d, dtype=torch.bfloat16, device="cuda")
    got_v = torch.zeros_like(got_k)
    _run(name, codec, store, ids, got_k, got_v, kernel=True)
    ref_k, ref_v = codec.dequantize(store, torch.arange(40, device="cuda"))
    torch.cuda.synchronize()
    assert rel_err(got_k[ids], ref_k) < 2e-2 and rel_err(got_v[ids], ref_v) < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("d", SIZES)
def test_lowrank_decode_bf16_gpu(d):
    g = torch.Generator().manual_seed(d)
    rk, rv = min(d, 48), min(d, 32)
    args = _decode_case(g, 3, 8, 2, d, rk, rv, torch.bfloat16, tails=[0, 17, 63], pages=[2, 3, 4])
    args = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    out = lowrank_decode_attention(**args, num_splits=2)
    ref = lowrank_decode_attention_ref(**_f32(args, ("q", "q_red", "dense_k", "dense_v")))
    assert rel_err(out, ref) < 2e-2
