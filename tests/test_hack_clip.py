"""The encoders' range clip (issue 19): HACK's Triton kernels == the torch reference on fresh
random pages, the stored range is [min, max] shrunk by clip on each side, the clip lowers the
reconstruction error at 2 bits, clip=0 is the old min/max rule bit for bit, the range stays a
continuous function of the page (decode's seal == scoring's encode), and KIVI's quantize.py runs
the same rule.

Triton kernels run under TRITON_INTERPRET=1 on CPU (fp16 / fp32 inputs).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede importing the kernel modules

import pytest  # noqa: E402

from zipserve.compress import quantize as qz  # noqa: E402
from zipserve.compress.hack import HackCodec  # noqa: E402
from zipserve.compress.kivi import KiviCodec  # noqa: E402
from zipserve.compress.rotation import hadamard  # noqa: E402
from zipserve.kernels import hack_encode as he  # noqa: E402
from zipserve.kernels.hack_layout import HackPages, hack_group_v, unpack_planar  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
P = 64


def _pages(seed, n, kvh, d, kind="gauss"):
    """Fresh K/V-like pages [n, KVH, P, D]: gaussian or heavy tailed, with offset wide channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, kvh, P, d, generator=g)
    if kind == "t":  # student-t like: gaussian / sqrt(chi2_3 / 3)
        x = x / torch.randn(3, n, kvh, P, d, generator=g).square().mean(0).sqrt()
    x[..., : max(d // 16, 1)] = x[..., : max(d // 16, 1)] * 4 + 3
    return x


def _cpu(pool):
    return HackPages(
        **{m: t.cpu() for m, t in pool.tensors().items()}, bits=pool.bits, group_v=pool.group_v
    )


def _sq_err(x, pool):
    """Summed squared reconstruction error of (k, v) fp32 under a pool (stored basis)."""
    kd, vd = he.hack_dequantize_ref(pool)
    return (kd - x[0]).square().sum().item(), (vd - x[1]).square().sum().item()


@pytest.mark.parametrize(
    "d,bits,rotate,dtype,clip,seed",
    [
        (64, 2, True, torch.float16, None, 1),
        (64, 4, False, torch.float32, 0.1, 2),
        (128, 2, False, torch.float32, 0.05, 3),
        (96, 2, True, torch.float32, None, 4),  # planes kernel, V groups of 2 planes
        (96, 4, False, torch.float16, 0.15, 5),  # planes kernel at 4 bits
        (32, 2, True, torch.float32, 0.1, 6),  # V groups of 4 planes
        (64, 2, False, torch.float32, 0, 7),
    ],
)
def test_kernel_matches_reference(d, bits, rotate, dtype, clip, seed):
    """Fresh random pages (new seeds, heavy tailed K): the kernel's codes / scales / mins / sums
    equal the reference's up to rounding ties; reconstructions agree to 1e-3 relative."""
    n, kvh = 3, 2
    gv = hack_group_v(d, bits, 32)
    k = _pages(100 + seed, n, kvh, d, "t").to(dtype).to(DEVICE)
    v = _pages(200 + seed, n, kvh, d).to(dtype).to(DEVICE)
    rot = hadamard(d, DEVICE) if rotate else None
    a = _cpu(he.hack_encode_pages(k, v, bits, gv, rotation=rot, clip=clip))
    b = _cpu(he.hack_encode_pages_ref(k, v, bits, gv, rotation=rot, clip=clip))
    for name in ("k_codes", "v_codes"):
        ca, cb = (unpack_planar(getattr(p, name), bits).int() for p in (a, b))
        assert (ca - cb).abs().max() <= 1 and (ca != cb).float().mean() < 1e-3, name
    for name in ("k_scale", "k_min", "v_scale", "v_min", "k_sums", "v_sums"):
        x, y = getattr(a, name).float(), getattr(b, name).float()
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-3), name
    for xa, xb in zip(he.hack_dequantize_ref(a), he.hack_dequantize_ref(b)):
        assert ((xa - xb).norm() / xb.norm()).item() < 1e-3
    c = he.clip_for(bits, clip)
    m = _cpu(he.hack_encode_pages_ref(k, v, bits, gv, rotation=rot, clip=0))
    for name in ("k_scale", "v_scale"):  # the clip shrank every range by 1 - 2c
        x, y = getattr(a, name).float(), getattr(m, name).float()
        assert torch.allclose(x, (1 - 2 * c) * y, rtol=3e-3, atol=1e-3), name


@pytest.mark.parametrize("d,bits,clip", [(64, 2, None), (96, 2, 0.1), (64, 4, 0.05)])
def test_stored_range_is_the_clipped_range(d, bits, clip):
    """Independently of the encoder: min = fp16(lo + c r), scale = fp16(((hi - c r) - (lo + c r))
    / qmax) per K channel and per V group (fp32 arithmetic), for the kernel and the reference."""
    gv = hack_group_v(d, bits, 32)
    k, v = _pages(11 + d, 2, 2, d, "t"), _pages(12 + d, 2, 2, d)
    c = he.clip_for(bits, clip)
    qmax = (1 << bits) - 1

    def want(x, dim):
        lo, hi = x.amin(dim), x.amax(dim)
        r = hi - lo
        a, b = lo + c * r, hi - c * r
        return ((b - a) / qmax).half(), a.half()

    ks, km = want(k, 2)
    vs, vm = want(v.unflatten(-1, (-1, gv)), -1)
    for fn in (he.hack_encode_pages, he.hack_encode_pages_ref):
        p = _cpu(fn(k.to(DEVICE), v.to(DEVICE), bits, gv, clip=clip))
        for got, w in ((p.k_scale, ks), (p.k_min, km), (p.v_scale, vs), (p.v_min, vm)):
            assert torch.allclose(got.float(), w.float(), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["gauss", "t"])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_clip_lowers_the_error_at_2_bits(kind, use_kernel):
    """On random pages the default 2-bit encoder's squared reconstruction error (K and V, with
    and without the rotation) is clearly below the min/max rule's; at 4 bits the default is the
    min/max rule exactly."""
    d, n, kvh = 64, 4, 2
    fn = he.hack_encode_pages if use_kernel else he.hack_encode_pages_ref
    k = _pages(7, n, kvh, d, kind).to(DEVICE)
    v = _pages(17, n, kvh, d, kind).to(DEVICE)
    for rot in (None, hadamard(d, DEVICE)):
        x = tuple((t.float() if rot is None else t.float() @ rot).cpu() for t in (k, v))
        old = _sq_err(x, _cpu(fn(k, v, 2, 32, rotation=rot, clip=0)))
        new = _sq_err(x, _cpu(fn(k, v, 2, 32, rotation=rot)))
        for eo, en, name in zip(old, new, "KV"):
            assert en < 0.85 * eo, (name, en / eo, rot is None)
        old4 = _cpu(fn(k, v, 4, 32, rotation=rot, clip=0))
        new4 = _cpu(fn(k, v, 4, 32, rotation=rot))
        for name, t in old4.tensors().items():
            assert torch.equal(t, new4.tensors()[name]), name


def test_min_max_rule_unchanged_with_clip_0():
    """clip=0 stores exactly the old rule: min = fp16(min), scale = fp16((max - min) / qmax)."""
    d, bits, gv = 64, 2, 32
    k, v = _pages(31, 2, 2, d), _pages(32, 2, 2, d)
    p = he.hack_encode_pages_ref(k, v, bits, gv, clip=0)
    assert torch.equal(p.k_min, k.amin(2).half())
    assert torch.equal(p.k_scale, ((k.amax(2) - k.amin(2)) / 3).half())
    vg = v.unflatten(-1, (-1, gv))
    assert torch.equal(p.v_min, vg.amin(-1).half())
    assert torch.equal(p.v_scale, ((vg.amax(-1) - vg.amin(-1)) / 3).half())


def test_range_is_continuous_in_the_page():
    """Pages that differ in the last bits (bf16 rounding, as decode's K differs from scoring's)
    get scales within 1% of each other in every group: no group jumps to another range (a
    per-group search over shrink candidates did, and decode then differed from scoring)."""
    d, bits, gv = 64, 2, 32
    k, v = _pages(71, 8, 2, d, "t"), _pages(72, 8, 2, d)
    kb, vb = k.bfloat16().float(), v.bfloat16().float()
    assert not torch.equal(k, kb)
    rot = hadamard(d)
    a = he.hack_encode_pages_ref(k, v, bits, gv, rotation=rot)
    b = he.hack_encode_pages_ref(kb, vb, bits, gv, rotation=rot)
    for name in ("k_scale", "v_scale"):
        x, y = getattr(a, name).float(), getattr(b, name).float()
        assert ((x - y).abs() <= 0.01 * x.abs() + 1e-3).all(), name


def test_codec_defaults_and_errors():
    assert HackCodec(2, P, 64, 2).clip == 0.1 and HackCodec(2, P, 64, 4).clip == 0.0
    assert HackCodec(2, P, 64, 2, clip=0).clip == 0.0
    assert KiviCodec(2, P, 64, 2).clip == 0.0
    for bad in (-0.1, 0.5, True, "0.1"):
        with pytest.raises(ValueError, match="clip"):
            he.clip_for(2, bad)
        with pytest.raises(ValueError, match="clip"):
            KiviCodec(2, P, 64, 2, clip=bad)
        with pytest.raises(ValueError, match="clip"):
            HackCodec(2, P, 64, 2, clip=bad)
    k, v = _pages(51, 1, 1, 64), _pages(52, 1, 1, 64)
    with pytest.raises(ValueError, match="clip"):
        he.hack_encode_pages_ref(k, v, 2, 32, clip=-1)


def test_kivi_clip():
    """KIVI's quantize.py with the clip: the clipped range per group, lower error at 2 bits;
    clip=0 is the min/max rule."""
    k = _pages(61, 2, 2, 64, "t")
    kc0, ks0, km0 = qz.k_per_channel(k, 2, 32)
    g = k.unflatten(2, (-1, 32))
    assert torch.equal(km0, g.amin(3).half())
    kc, ks, km = qz.k_per_channel(k, 2, 32, clip=0.1)
    r = g.amax(3) - g.amin(3)
    assert torch.equal(km, (g.amin(3) + 0.1 * r).half())
    e0 = (qz.dequant_k(kc0, ks0, km0) - k).square().sum()
    e1 = (qz.dequant_k(kc, ks, km) - k).square().sum()
    assert e1 < 0.85 * e0
    vc0, vs0, vm0 = qz.v_per_token(k, 2, 32)
    vc, vs, vm = qz.v_per_token(k, 2, 32, clip=0.1)
    f0 = (qz.dequant_v(vc0, vs0, vm0) - k).square().sum()
    f1 = (qz.dequant_v(vc, vs, vm) - k).square().sum()
    assert f1 < 0.85 * f0
