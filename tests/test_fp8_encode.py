"""The fp8 encode kernel (kernels/fp8_encode.py) against its torch reference on fresh random pages:
Triton in the interpreter on CPU, strided k/v, page ids a shuffled subset of a larger pool, only
those rows written, codes and scales bit-exact; a decode step's seal (src_rows / skip_page); the
reference against Fp8Codec.encode; the kernel's e4m3 conversion against torch's cast; argument
checks. A GPU variant at a serving shape."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from zipserve.compress.fp8 import Fp8Codec  # noqa: E402
from zipserve.kernels.fp8_encode import (  # noqa: E402
    _e4m3_bits,
    _launch,
    fp8_encode_pages,
    fp8_encode_pages_ref,
)

CODES = ("k", "v")
SCALES = ("k_scale", "v_scale")
SENTINEL_CODE, SENTINEL_SCALE = 0xA5, -7.0


def _pages(gen, n, kvh, p, d, dtype, device="cpu"):
    """Fresh random k, v [n, KVH, P, D] as strided views: k a KVH slice of a wider tensor, v a
    token-major [n, P, KVH, D] tensor transposed. K has outlier channels and one outlier token,
    V an offset; page 0 head 0 of K and V is all zeros (amax 0 -> scale 1)."""
    k = torch.randn(n, kvh + 3, p, d, generator=gen) * torch.linspace(0.2, 4.0, d)
    v = torch.randn(n, p, kvh, d, generator=gen) + 0.5
    k[-1, 1, p // 2, d // 3] = 900.0  # an outlier: the rest of its page / head quantizes coarsely
    v[-1, 1, 0, 1] = -250.0
    k[0, 1] = 0.0  # (k[:, 1] is head 0 after the slice below)
    v[0, :, 0] = 0.0
    k = k.to(device=device, dtype=dtype)[:, 1 : 1 + kvh]  # [n, KVH, P, D], stride over KVH+3
    v = v.to(device=device, dtype=dtype).transpose(1, 2)  # [n, KVH, P, D], token stride KVH*D
    assert not k.is_contiguous() and not v.is_contiguous()
    return k, v


def _sentinel_store(kvh, p, d, n_pool, device="cpu"):
    """Fp8Codec.new_store's store whose every byte is a sentinel (codes 0xA5, scales -7)."""
    store = Fp8Codec(kvh, p, d).new_store(n_pool, device)
    for name in CODES:
        store[name].view(torch.uint8).fill_(SENTINEL_CODE)
    for name in SCALES:
        store[name].fill_(SENTINEL_SCALE)
    return store


def _assert_equal(a, b):
    """Two stores bit for bit (fp8 compared as bytes: NaN codes too)."""
    for name in CODES:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    for name in SCALES:
        assert torch.equal(a[name], b[name]), name


def _assert_untouched(store, written, n_pool):
    """Rows of the pool not in `written` still hold the sentinel."""
    keep = torch.ones(n_pool, dtype=torch.bool)
    keep[written.cpu().long()] = False
    for name in CODES:
        assert (store[name].view(torch.uint8).cpu()[keep] == SENTINEL_CODE).all(), name
    for name in SCALES:
        assert (store[name].cpu()[keep] == SENTINEL_SCALE).all(), name


def _encode_both(k, v, ids, n_pool, **kw):
    _, kvh, p, d = k.shape
    got, want = (_sentinel_store(kvh, p, d, n_pool, k.device) for _ in range(2))
    fp8_encode_pages(k, v, got, ids, **kw)
    fp8_encode_pages_ref(k, v, want, ids, **kw)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p,d", [(64, 64), (64, 128), (64, 96), (16, 128), (24, 40)])
def test_kernel_matches_reference(p, d, dtype):
    gen = torch.Generator().manual_seed(1000 * p + d)
    n, kvh, n_pool = 3, 2, 7
    k, v = _pages(gen, n, kvh, p, d, dtype)
    ids = torch.randperm(n_pool, generator=gen)[:n]  # int64, shuffled subset of the pool
    got, want = _encode_both(k, v, ids, n_pool)
    _assert_equal(got, want)
    _assert_untouched(got, ids, n_pool)
    assert got["k_scale"][ids[0], 0] == 1.0 and got["v_scale"][ids[0], 0] == 1.0  # zero pages
    assert (got["k"][ids[0], 0].view(torch.uint8) == 0).all()
    assert got["k_scale"][ids[-1], 0] == torch.tensor(900.0) / 448  # the outlier's page
    deq = got["k"][ids].float() * got["k_scale"][ids][:, :, None, None]
    assert float((deq - k.float()).norm() / k.float().norm()) < 0.05


def test_no_pages_is_a_no_op():
    store = _sentinel_store(2, 64, 64, 3)
    empty = torch.zeros(0, 2, 64, 64)
    for fn in (fp8_encode_pages, fp8_encode_pages_ref):
        fn(empty, empty, store, torch.zeros(0, dtype=torch.int32))
    _assert_untouched(store, torch.zeros(0, dtype=torch.long), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seal_rows_reads_rows_in_place_and_skips_the_scratch_page(dtype):
    """A decode step's seal: page i from row src_rows[i] of the open pages; programs whose page is
    skip_page write nothing. Kernel (interpreter) and reference equal encoding the gathered rows
    that fill a page."""
    gen = torch.Generator().manual_seed(40)
    k, v = _pages(gen, 4, 2, 64, 64, dtype)  # 4 open pages (slots)
    rows = torch.tensor([3, 0, 2, 1], dtype=torch.int32)
    ids = torch.tensor([0, 4, 2, 0], dtype=torch.int32)  # rows 3 and 1 fill no page: scratch 0
    got, want_kw = _encode_both(k, v, ids, 5, src_rows=rows, skip_page=0)
    want = _sentinel_store(2, 64, 64, 5)
    fp8_encode_pages_ref(k[[0, 2]], v[[0, 2]], want, ids[1:3])
    for store in (got, want_kw):
        _assert_equal(store, want)
        _assert_untouched(store, ids[1:3], 5)  # the scratch page keeps its sentinel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 96])
def test_reference_is_the_definition_and_what_the_codec_stores(d, dtype):
    """The reference equals the codec's definition written out page by page and head by head
    (amax over the tile in fp32, scale amax / 448 or 1, codes x / scale cast to e4m3: pins the
    math); Fp8Codec.encode and seal_rows store exactly that."""
    gen = torch.Generator().manual_seed(d)
    k, v = _pages(gen, 3, 2, 64, d, dtype)
    ids = torch.tensor([4, 1, 2])
    got, want = _sentinel_store(2, 64, d, 5), _sentinel_store(2, 64, d, 5)
    fp8_encode_pages_ref(k, v, got, ids)
    for name, x in (("k", k), ("v", v)):
        for i, page in enumerate(ids.tolist()):
            for h in range(2):
                tile = x[i, h].float()  # [P, D]
                amax = tile.abs().max()
                scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
                want[name][page, h] = (tile / scale).to(torch.float8_e4m3fn)
                want[name + "_scale"][page, h] = scale
    _assert_equal(got, want)
    codec = Fp8Codec(2, 64, d)
    via_encode = _sentinel_store(2, 64, d, 5)
    codec.encode(via_encode, ids, k, v)
    _assert_equal(via_encode, want)
    via_seal = _sentinel_store(2, 64, d, 5)  # rows 1, 2, 0 of the open pages; row 2 fills none
    codec.seal_rows(
        via_seal, torch.tensor([2, 0, 4]), k, v, torch.tensor([1, 2, 0], dtype=torch.int32), 0
    )
    sealed = _sentinel_store(2, 64, d, 5)
    fp8_encode_pages_ref(k[[1, 0]], v[[1, 0]], sealed, torch.tensor([2, 4]))
    _assert_equal(via_seal, sealed)


@triton.jit
def _e4m3_probe(x_ptr, o_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(o_ptr + offs, _e4m3_bits(tl.load(x_ptr + offs)).to(tl.uint8))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN input
def test_e4m3_conversion_is_torchs():
    """The kernel's integer conversion (the one the interpreter runs) equals torch's cast on every
    e4m3 value, every midpoint between two (ties), a few fp32 ulps around them, subnormals,
    saturation, +-inf, NaN and random values."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[~vals.isnan()].sort().values
    special = [464.0, 479.0, 480.0, 1e6, float("inf"), 2.0**-10, 3 * 2.0**-11, 1e-30, 1e-40]
    base = torch.cat([vals, (vals[1:] + vals[:-1]) / 2, torch.tensor(special)])
    base = torch.cat([base, -base]).view(torch.int32)
    near = torch.cat([(base + i).view(torch.float32) for i in range(-2, 3)])
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([near, torch.randn(4096, generator=gen) * 100, torch.tensor([float("nan")])])
    n = triton.next_power_of_2(x.numel())
    x = torch.nn.functional.pad(x, (0, n - x.numel()))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(n, dtype=torch.uint8, device=dev)
    _e4m3_probe[(1,)](x.to(dev), out, n)
    out = out.cpu()
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(out, want), x[out != want][:8]


def _args(**over):
    """Valid arguments of fp8_encode_pages (n=2, KVH=2, P=64, D=64), some replaced."""
    k = torch.zeros(2, 2, 64, 64)
    args = dict(
        k=k,
        v=torch.zeros_like(k),
        store=Fp8Codec(2, 64, 64).new_store(4, "cpu"),
        page_ids=torch.tensor([0, 3]),
    )
    args.update(over)
    return args


def _store_with(name, t):
    store = Fp8Codec(2, 64, 64).new_store(4, "cpu")
    store[name] = t
    return store


@pytest.mark.parametrize("fn", [fp8_encode_pages, fp8_encode_pages_ref])
@pytest.mark.parametrize(
    "over,match",
    [
        (dict(k=torch.zeros(2, 2, 64)), "k must"),
        (dict(v=torch.zeros(2, 2, 32, 64)), "v shape"),
        (dict(v=torch.zeros(2, 2, 64, 64, dtype=torch.float16)), "dtype"),
        (dict(k=torch.zeros(2, 2, 64, 7), v=torch.zeros(2, 2, 64, 7)), "head_dim"),
        (dict(page_ids=torch.tensor([0, 1, 2])), "page_ids"),
        (dict(page_ids=torch.tensor([0.0, 1.0])), "page_ids"),
        (dict(page_ids=[0, 1]), "page_ids"),
        (dict(src_rows=torch.tensor([0, 1])), "src_rows"),  # int64
        (dict(skip_page=True), "skip_page"),
        (dict(store={}), r"store\['k'\]"),
        (dict(store=_store_with("k", torch.zeros(4, 2, 64, 64))), r"store\['k'\]"),
        (dict(store=_store_with("v", torch.zeros(4, 2, 64, 64, dtype=torch.uint8))), r"\['v'\]"),
        (dict(store=_store_with("v_scale", torch.zeros(4, 2).half())), r"store\['v_scale'\]"),
        (dict(store=_store_with("k_scale", torch.zeros(4, 3))), r"store\['k_scale'\]"),
        (dict(store=Fp8Codec(2, 64, 128).new_store(4, "cpu")), r"store\['k'\]"),
    ],
)
def test_bad_arguments_raise(fn, over, match):
    with pytest.raises(ValueError, match=match):
        fn(**_args(**over))


def test_kernel_needs_contiguous_store_and_last_dim():
    k = torch.zeros(2, 2, 64, 128)[..., ::2]  # [2, 2, 64, 64], channel stride 2
    with pytest.raises(ValueError, match="k must have a contiguous last dim"):
        fp8_encode_pages(**_args(k=k))
    fp8_encode_pages_ref(**_args(k=k))  # the reference takes any strides
    scale = torch.zeros(2, 4).t()  # [4, 2], not contiguous
    with pytest.raises(ValueError, match=r"store\['k_scale'\] must be contiguous"):
        fp8_encode_pages(**_args(store=_store_with("k_scale", scale)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_reference_gpu():
    """bf16 at a serving shape: the hardware conversion and the integer one both bit-exact, the
    seal path too."""
    gen = torch.Generator().manual_seed(7)
    n, kvh, p, d, n_pool = 32, 8, 64, 128, 48
    k, v = _pages(gen, n, kvh, p, d, torch.bfloat16, device="cuda")
    ids = torch.randperm(n_pool, generator=gen)[:n].cuda()
    got, want = _encode_both(k, v, ids, n_pool)
    torch.cuda.synchronize()
    _assert_equal(got, want)
    _assert_untouched(got, ids, n_pool)
    soft = _sentinel_store(kvh, p, d, n_pool, "cuda")
    _launch(k, v, soft, ids, None, None, soft_cvt=True)
    _assert_equal(soft, want)
    rows = torch.randperm(n, generator=gen)[:24].to(device="cuda", dtype=torch.int32)
    seal_ids = ids[:24].clone()
    seal_ids[::3] = ids[0]  # a third of the rows go to the scratch page ids[0]
    got, want = _encode_both(k, v, seal_ids, n_pool, src_rows=rows, skip_page=int(ids[0]))
    _assert_equal(got, want)
    _assert_untouched(got, seal_ids[seal_ids != ids[0]], n_pool)
