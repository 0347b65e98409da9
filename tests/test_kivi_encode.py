"""The KIVI encode kernel (kernels/kivi_encode.py) against its torch reference on fresh random
pages: Triton in the interpreter on CPU (fp16 / fp32 inputs: it has no bfloat16), strided k/v,
page ids a shuffled subset of a larger pool, only those rows written; the dequantized pages
near the input; argument checks; KiviCodec's dispatch. A GPU variant at a serving shape."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402

from zipserve.compress import quantize as qz  # noqa: E402
from zipserve.compress.kivi import KiviCodec  # noqa: E402
from zipserve.kernels.hack_layout import unpack_planar  # noqa: E402
from zipserve.kernels.kivi_encode import (  # noqa: E402
    _kivi_encode_kernel,
    kivi_encode_pages,
    kivi_encode_pages_ref,
)
from zipserve.kernels.paged_decode_attention import is_interpreted  # noqa: E402

CODES = ("k_codes", "v_codes")
SIDE = ("k_scale", "k_min", "v_scale", "v_min")
REL_ERR = {2: 0.45, 4: 0.1}  # dequantized vs input, relative L2 (clip 0: measured ~0.39 / ~0.08)


def _pages(gen, n, kvh, p, d, dtype, device="cpu"):
    """Fresh random k, v [n, KVH, P, D] as strided views: k a KVH slice of a wider tensor, v a
    token-major [n, P, KVH, D] tensor transposed. K has outlier channels, V an offset."""
    k = torch.randn(n, kvh + 3, p, d, generator=gen) * torch.linspace(0.2, 4.0, d)
    v = torch.randn(n, p, kvh, d, generator=gen) + 0.5
    k = k.to(device=device, dtype=dtype)[:, 1 : 1 + kvh]  # [n, KVH, P, D], stride over KVH+3
    v = v.to(device=device, dtype=dtype).transpose(1, 2)  # [n, KVH, P, D], token stride KVH*D
    assert not k.is_contiguous() and not v.is_contiguous()
    return k, v


def _sentinel_store(codec: KiviCodec, n_pool: int, device="cpu") -> dict[str, torch.Tensor]:
    """A store whose every byte is a sentinel (codes 0xA5, scales / mins -7)."""
    store = codec.new_store(n_pool, device)
    for name, t in store.items():
        t.fill_(0xA5 if name in CODES else -7.0)
    return store


def _encode_both(k, v, bits, ids, n_pool, clip, tg=32, cg=32):
    """(kernel store, reference store) of k, v written at ids into sentinel stores."""
    _, kvh, p, d = k.shape
    codec = KiviCodec(kvh, p, d, bits)
    codec.token_group, codec.channel_group = tg, cg  # new_store's group sizes
    got, want = _sentinel_store(codec, n_pool, k.device), _sentinel_store(codec, n_pool, k.device)
    kivi_encode_pages(k, v, bits, got, ids, clip, tg, cg)
    kivi_encode_pages_ref(k, v, bits, want, ids, clip, tg, cg)
    return got, want


def _assert_codes_match(a, b, bits, exact):
    """Unpacked codes of two stores: >= 99.9 % equal and never more than one apart (GPU fp32
    division may round an exact tie the other way); equal everywhere when `exact`."""
    ca, cb = unpack_planar(a, bits).int(), unpack_planar(b, bits).int()
    assert (ca - cb).abs().max() <= 1
    assert (ca == cb).float().mean() >= 0.999
    if exact:
        assert torch.equal(ca, cb)


def _assert_side_match(a, b, exact):
    """fp16 scales / mins of two stores: equal, or (GPU: fp32 division / fused multiply-adds
    in the range) at most one fp16 ulp apart on <= 0.1 % of them."""
    if exact:
        assert torch.equal(a, b)
        return
    af, bf = a.float(), b.float()
    assert torch.isclose(af, bf, rtol=2**-10, atol=2**-24).all()
    assert (af == bf).float().mean() >= 0.999


def _assert_untouched(store, ids, n_pool):
    """Rows of the pool not in ids still hold the sentinel."""
    keep = torch.ones(n_pool, dtype=torch.bool)
    keep[ids.cpu()] = False
    for name, t in store.items():
        fill = 0xA5 if name in CODES else -7.0
        assert (t.cpu()[keep] == fill).all(), name


def _rel_err(store, ids, bits, k, v):
    """Relative L2 error of the dequantized pages at ids against the input k, v."""
    ids = ids.long()
    dk = qz.dequant_k(
        unpack_planar(store["k_codes"][ids], bits), store["k_scale"][ids], store["k_min"][ids]
    )
    dv = qz.dequant_v(
        unpack_planar(store["v_codes"][ids], bits), store["v_scale"][ids], store["v_min"][ids]
    )
    err = lambda a, b: float((a - b.float()).norm() / b.float().norm())  # noqa: E731
    return err(dk, k), err(dv, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("clip", [0.0, 0.1])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_matches_reference(d, bits, clip, dtype):
    gen = torch.Generator().manual_seed(1000 * d + 10 * bits + int(clip * 10))
    n, kvh, p, n_pool = 3, 2, 64, 8
    k, v = _pages(gen, n, kvh, p, d, dtype)
    ids = torch.randperm(n_pool, generator=gen)[:n]  # int64, shuffled subset of the pool
    got, want = _encode_both(k, v, bits, ids, n_pool, clip)
    exact = is_interpreted(_kivi_encode_kernel)  # the interpreter divides as torch does
    for name in SIDE:
        _assert_side_match(got[name], want[name], exact)
    for name in CODES:
        _assert_codes_match(got[name], want[name], bits, exact)
    _assert_untouched(got, ids, n_pool)
    _assert_untouched(want, ids, n_pool)
    for e in _rel_err(got, ids, bits, k, v):
        assert e < REL_ERR[bits] + clip  # a clip saturates a group's tails: a little more error


@pytest.mark.parametrize("tg,cg", [(16, 32), (16, 16), (64, 64)])
def test_other_group_sizes(tg, cg):
    """bench/kivi_equal_bytes.py's KIVI variants (and whole-page / whole-head groups)."""
    gen = torch.Generator().manual_seed(tg * 100 + cg)
    k, v = _pages(gen, 2, 2, 64, 64, torch.float32)
    ids = torch.tensor([3, 0], dtype=torch.int32)
    got, want = _encode_both(k, v, 2, ids, 4, 0.0, tg, cg)
    exact = is_interpreted(_kivi_encode_kernel)
    for name in SIDE:
        _assert_side_match(got[name], want[name], exact)
    for name in CODES:
        _assert_codes_match(got[name], want[name], 2, exact)
    _assert_untouched(got, ids, 4)


def test_no_pages_is_a_no_op():
    codec = KiviCodec(2, 64, 64, 2)
    store = _sentinel_store(codec, 4)
    empty = torch.zeros(0, 2, 64, 64)
    kivi_encode_pages(empty, empty, 2, store, torch.zeros(0, dtype=torch.long))
    _assert_untouched(store, torch.zeros(0, dtype=torch.long), 4)


@pytest.mark.parametrize("bits", [2, 4])
def test_codec_encode_on_cpu_is_the_reference(bits):
    """KiviCodec.encode on CPU tensors stores exactly the reference's pages."""
    gen = torch.Generator().manual_seed(bits)
    k, v = _pages(gen, 3, 2, 64, 64, torch.float32)
    ids = torch.tensor([4, 1, 2])
    codec = KiviCodec(2, 64, 64, bits, clip=0.1)
    got, want = _sentinel_store(codec, 5), _sentinel_store(codec, 5)
    codec.encode(got, ids, k, v)
    kivi_encode_pages_ref(k, v, bits, want, ids, 0.1)
    for name in got:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("bits", [2, 4])
def test_seal_rows_reads_rows_in_place_and_skips_the_scratch_page(bits):
    """A decode step's seal: page i from row src_rows[i] of the open pages; programs whose page is
    skip_page write nothing. Kernel (interpreter) and reference equal encoding the gathered rows
    that fill a page; KiviCodec.seal_rows takes this path."""
    gen = torch.Generator().manual_seed(40 + bits)
    k, v = _pages(gen, 4, 2, 64, 64, torch.float32)  # 4 open pages (slots)
    rows = torch.tensor([3, 0, 2], dtype=torch.int32)
    ids = torch.tensor([0, 4, 2])  # row 3 fills no page: the scratch page 0
    codec = KiviCodec(2, 64, 64, bits)
    stores = []
    for fn in (kivi_encode_pages, kivi_encode_pages_ref):
        store = _sentinel_store(codec, 5)
        fn(k, v, bits, store, ids, 0.0, src_rows=rows, skip_page=0)
        stores.append(store)
    want = _sentinel_store(codec, 5)
    kivi_encode_pages_ref(k[[0, 2]], v[[0, 2]], bits, want, ids[1:])
    via_codec = _sentinel_store(codec, 5)
    codec.seal_rows(via_codec, ids, k, v, rows, 0)
    for store in (*stores, via_codec):
        for name in store:
            assert torch.equal(store[name], want[name]), name
        _assert_untouched(store, ids[1:], 5)  # the scratch page keeps its sentinel
    with pytest.raises(ValueError, match="src_rows"):
        kivi_encode_pages_ref(k, v, bits, want, ids, src_rows=rows.long())


def _args(**over):
    """Valid arguments of kivi_encode_pages (n=2, KVH=2, P=64, D=64, 2 bits), some replaced."""
    k = torch.zeros(2, 2, 64, 64)
    args = dict(
        k=k,
        v=torch.zeros_like(k),
        bits=2,
        store=KiviCodec(2, 64, 64, 2).new_store(4, "cpu"),
        page_ids=torch.tensor([0, 3]),
    )
    args.update(over)
    return args


@pytest.mark.parametrize("fn", [kivi_encode_pages, kivi_encode_pages_ref])
@pytest.mark.parametrize(
    "over,match",
    [
        (dict(bits=3), "bits"),
        (dict(bits=True), "bits"),
        (dict(clip=0.5), "clip"),
        (dict(k=torch.zeros(2, 2, 64)), "k must"),
        (dict(v=torch.zeros(2, 2, 32, 64)), "v shape"),
        (dict(v=torch.zeros(2, 2, 64, 64, dtype=torch.float16)), "dtype"),
        (dict(k=torch.zeros(2, 2, 64, 64, dtype=torch.int32)), "dtype"),
        (dict(k=torch.zeros(2, 2, 48, 64), v=torch.zeros(2, 2, 48, 64)), "page_size"),
        (dict(k=torch.zeros(2, 2, 64, 48), v=torch.zeros(2, 2, 64, 48)), "head_dim"),
        (dict(token_group=0), "token_group"),
        (dict(page_ids=torch.tensor([0, 1, 2])), "page_ids"),
        (dict(page_ids=torch.tensor([0.0, 1.0])), "page_ids"),
        (dict(page_ids=[0, 1]), "page_ids"),
        (dict(store={}), "store"),
        (dict(store=KiviCodec(2, 64, 64, 4).new_store(4, "cpu")), r"store\['k_codes'\]"),
        (dict(store=KiviCodec(2, 64, 128, 2).new_store(4, "cpu")), "store"),
    ],
)
def test_bad_arguments_raise(fn, over, match):
    with pytest.raises(ValueError, match=match):
        fn(**_args(**over))


def test_bad_store_side_tensor_names_it():
    store = KiviCodec(2, 64, 64, 2).new_store(4, "cpu")
    store["v_min"] = store["v_min"].float()
    with pytest.raises(ValueError, match=r"store\['v_min'\]"):
        kivi_encode_pages(**_args(store=store))


def test_kernel_needs_power_of_two_tiles():
    """page_size 96 (a multiple of 32): the kernel refuses it by name, the reference takes it."""
    k = torch.randn(1, 2, 96, 64, generator=torch.Generator().manual_seed(5))
    store = KiviCodec(2, 96, 64, 2).new_store(2, "cpu")
    ids = torch.tensor([1])
    with pytest.raises(ValueError, match="page_size / head_dim.*powers of two"):
        kivi_encode_pages(k, k, 2, store, ids)
    kivi_encode_pages_ref(k, k, 2, store, ids)
    assert store["k_scale"][1].abs().sum() > 0


def test_kernel_needs_contiguous_store_and_last_dim():
    k = torch.zeros(2, 2, 64, 128)[..., ::2]  # [2, 2, 64, 64], channel stride 2
    with pytest.raises(ValueError, match="k must have a contiguous last dim"):
        kivi_encode_pages(**_args(k=k))
    store = KiviCodec(2, 64, 64, 2).new_store(4, "cpu")
    store["k_min"] = store["k_min"].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match=r"store\['k_min'\] must be contiguous"):
        kivi_encode_pages(**_args(store=store))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("clip", [0.0, 0.1])
@pytest.mark.parametrize("bits", [2, 4])
def test_kernel_matches_reference_gpu(bits, clip):
    gen = torch.Generator().manual_seed(bits * 10 + int(clip * 10))
    n, kvh, p, d, n_pool = 64, 8, 64, 128, 96
    k, v = _pages(gen, n, kvh, p, d, torch.bfloat16, device="cuda")
    ids = torch.randperm(n_pool, generator=gen)[:n].cuda()
    got, want = _encode_both(k, v, bits, ids, n_pool, clip)
    torch.cuda.synchronize()
    for name in SIDE:
        _assert_side_match(got[name], want[name], exact=False)
    for name in CODES:
        _assert_codes_match(got[name], want[name], bits, exact=False)
    _assert_untouched(got, ids, n_pool)
    for e in _rel_err(got, ids, bits, k, v):
        assert e < REL_ERR[bits] + clip
    codec = KiviCodec(kvh, p, d, bits, clip)  # on CUDA the codec takes the kernel
    store = _sentinel_store(codec, n_pool, "cuda")
    codec.encode(store, ids, k, v)
    for name in store:
        assert torch.equal(store[name], got[name]), name
