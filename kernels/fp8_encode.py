"""fp8 page encoder: full 16-bit (or fp32) KV pages -> e4m3 pages with one fp32 scale per page and
KV head, written into an fp8 store (compress/fp8.py) at given page ids, in one launch.

  * ``fp8_encode_pages``      -- Triton kernel + host wrapper.
  * ``fp8_encode_pages_ref``  -- pure-torch reference with the same signature (Fp8Codec.encode's
    math, bit for bit).

``fp8_encode_pages(k, v, store, page_ids, src_rows=None, skip_page=None) -> None``
  k, v       [n, KVH, P, D] full pages (float16 / bfloat16 / float32, equal dtypes); the kernel
             reads strided views whose last dim is contiguous.
  store      Fp8Codec.new_store's dict of contiguous tensors, N pool pages: "k", "v"
             float8_e4m3fn [N, KVH, P, D], "k_scale", "v_scale" float32 [N, KVH].
  page_ids   int32 / int64 [m] on k's device: page i is written into pool page page_ids[i]
             (distinct and in range: not checked by the kernel), except skip_page, which may
             repeat. Nothing else of the store changes.
  src_rows   optional int32 [m]: page i is row src_rows[i] of k / v (read in place: a decode
             step's open pages); default row i (then m == n).
  skip_page  optional page id whose programs write nothing (the engine's scratch page: the rows
             of a decode step that fill no page; the grid stays the batch, CUDA-graph safe).

Math (Fp8Codec.encode), per page and KV head, for K and V apart: amax = max |x| over [P, D] in
fp32, scale = amax / 448 if amax > 0 else 1, codes = e4m3(x_fp32 / scale) rounded to nearest
even. The kernel divides with ``div_rn`` (IEEE, as torch does; Triton's ``/`` is an approximate
division on GPU), so it equals the reference bit for bit on CPU (interpreter) and on GPU.

Kernel: grid (m, KVH), one program per (page, kv head) loads the [P, D] K and V tiles (padded to
powers of two in registers, masked: any page_size, any even head_dim in [8, 256]), reduces each
tile's amax and stores its codes and scale. The store's fp8 tensors are passed as uint8 views and
the kernel stores code bytes: on GPU the hardware conversion (``.to(tl.float8e4nv)``,
cvt.rn.satfinite: RNE, saturating, as torch's cast) bitcast to uint8; under
TRITON_INTERPRET=1 an integer RNE conversion (_e4m3_bits, torch's c10 algorithm), since the
interpreter's own fp8 cast does not round to nearest even (ties, mantissa carry and subnormals
come out wrong).
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import (
    check_kernel_layout,
    check_kv_pages,
    check_page_ids,
    check_store,
    kernel_rows,
    page_strides,
    pages_read,
    put_rows,
    rows_written,
)
from zipserve.kernels.head_dim import block_d, head_dim_error, head_dim_ok, next_pow2
from zipserve.kernels.paged_decode_attention import is_interpreted, require_runnable

__all__ = ["fp8_encode_pages", "fp8_encode_pages_ref"]

FP8_MAX = 448.0
_FP8 = torch.float8_e4m3fn


@triton.jit
def _e4m3_bits(y):
    """fp32 y -> e4m3fn code bytes (int32 in [0, 255]) rounded to nearest even and saturating
    (|y| >= 448 and +-inf give +-448, NaN gives 0x7F with y's sign): torch's (2.13, CPU) cast and
    sm_90's cvt.rn.satfinite."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF  # |y| bits
    # |y| < 2^-6 (subnormal codes): adding 2^14 (ulp 2^-9, e4m3's subnormal step) rounds |y| to
    # the nearest even multiple of 2^-9; its low bits are the code.
    sub = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    # normal codes: rebias the exponent (127 -> 7), round the 23-bit mantissa to 3 bits (RNE).
    odd = (a >> 20) & 1
    nrm = ((a + ((7 - 127) << 23) + 0x7FFFF + odd) >> 20) & 0xFF
    code = tl.where(a < (121 << 23), sub, nrm)
    code = tl.where(a >= 0x43E00000, 0x7E, code)  # |y| >= 448 (and inf): 448
    code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
    return code | sign


@triton.jit
def _encode_tile(x, codes_ptr, scale_ptr, row, offs, ok, SOFT_CVT: tl.constexpr):
    """x [BP, BD] fp32 (padding zero) -> codes at codes_ptr + row * P * D + offs, scale at
    scale_ptr + row."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    y = tl.math.div_rn(x, scale)
    if SOFT_CVT:
        code = _e4m3_bits(y).to(tl.uint8)
    else:
        code = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(codes_ptr + offs, code, mask=ok)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _fp8_encode_kernel(
    k_ptr,
    v_ptr,  # [n, KVH, P, D] strided, last dim contiguous
    ids_ptr,  # [m] pool page of page i
    src_ptr,  # [m] int32: page i is row src[i] of k / v
    skip,  # page id whose programs write nothing (-1: none)
    kc_ptr,
    vc_ptr,  # uint8 views of the store's e4m3 [N, KVH, P, D] (contiguous)
    ks_ptr,
    vs_ptr,  # float32 [N, KVH] (contiguous)
    stride_kn,
    stride_kh,
    stride_kt,
    stride_vn,
    stride_vh,
    stride_vt,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SOFT_CVT: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    page = tl.load(ids_ptr + i).to(tl.int64)
    if page != skip:  # rows sealing into the skipped (scratch) page write nothing
        src = tl.load(src_ptr + i).to(tl.int64)
        row = page * tl.num_programs(1) + h  # (page, head) row of the pool
        offs_t = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_t < PAGE)[:, None] & (offs_d < HEAD_DIM)[None, :]  # [BP, BD]
        k = tl.load(
            k_ptr + src * stride_kn + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :],
            mask=ok,
            other=0.0,
        )
        v = tl.load(
            v_ptr + src * stride_vn + h * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :],
            mask=ok,
            other=0.0,
        )
        offs = row * (PAGE * HEAD_DIM) + offs_t[:, None] * HEAD_DIM + offs_d[None, :]
        _encode_tile(k.to(tl.float32), kc_ptr, ks_ptr, row, offs, ok, SOFT_CVT)
        _encode_tile(v.to(tl.float32), vc_ptr, vs_ptr, row, offs, ok, SOFT_CVT)


def _check_args(k, v, store, page_ids, src_rows=None, skip_page=None) -> int:
    """Validate the arguments both paths share; returns m, the pages written. ValueError names
    the argument."""
    check_kv_pages(k, v)
    _, kvh, page, d = k.shape
    if not head_dim_ok(d):
        raise ValueError(head_dim_error(d, "k head_dim"))
    m = pages_read(k, src_rows)
    check_page_ids(page_ids, m, k.device)
    if skip_page is not None and (isinstance(skip_page, bool) or not isinstance(skip_page, int)):
        raise ValueError(f"skip_page must be None or an int, got {skip_page!r}")
    if not isinstance(store, dict):
        raise ValueError(f"store must be a dict of tensors, got {type(store).__name__}")
    kc = store.get("k")
    if not isinstance(kc, torch.Tensor) or kc.dim() != 4:
        raise ValueError(f"store['k'] must be a [N, KVH, P, D] tensor, got {kc!r:.80}")
    n_pool = kc.shape[0]
    codes, scales = (n_pool, kvh, page, d), (n_pool, kvh)
    want = {"k": (codes, _FP8), "v": (codes, _FP8)}
    want |= {"k_scale": (scales, torch.float32), "v_scale": (scales, torch.float32)}
    check_store(store, want, k.device)
    return m


def _launch(k, v, store, page_ids, src_rows, skip_page, soft_cvt: bool) -> None:
    """The kernel launch (arguments checked); soft_cvt: the integer e4m3 conversion instead of
    the hardware one (the interpreter needs it; on GPU the two are equal)."""
    _, kvh, page, d = k.shape
    m = page_ids.shape[0]
    if m == 0 or kvh == 0 or page == 0:
        return
    src, skip = kernel_rows(src_rows, skip_page, m, k.device)
    bp, bd = next_pow2(page), block_d(d)
    _fp8_encode_kernel[(m, kvh)](
        k,
        v,
        page_ids,
        src,
        skip,
        store["k"].view(torch.uint8),
        store["v"].view(torch.uint8),
        store["k_scale"],
        store["v_scale"],
        *page_strides(k, v),
        PAGE=page,
        HEAD_DIM=d,
        BLOCK_P=bp,
        BLOCK_D=bd,
        SOFT_CVT=soft_cvt,
        num_warps=max(4, min(16, bp * bd // 1024)),  # 64 x 128: 8 warps, 75 registers
    )


def fp8_encode_pages(k, v, store, page_ids, src_rows=None, skip_page=None) -> None:
    """Quantize full pages k, v [n, KVH, P, D] into store rows page_ids (module doc), in one
    Triton launch. Needs k/v with a contiguous last dim and contiguous store tensors.
    src_rows (int32 [m]): page i is row src_rows[i] of k / v, read in place; skip_page: a page id
    whose programs write nothing (a decode step's rows that fill no page: CUDA-graph safe)."""
    _check_args(k, v, store, page_ids, src_rows, skip_page)
    check_kernel_layout(k, v, store, ("k", "v", "k_scale", "v_scale"))
    require_runnable("fp8_encode_pages", _fp8_encode_kernel, k)
    _launch(k, v, store, page_ids, src_rows, skip_page, soft_cvt=is_interpreted(_fp8_encode_kernel))


def fp8_encode_pages_ref(k, v, store, page_ids, src_rows=None, skip_page=None) -> None:
    """Pure-torch reference of fp8_encode_pages (same signature; any strides): Fp8Codec.encode's
    ops on the pages read (src_rows) that do not go to skip_page."""
    _check_args(k, v, store, page_ids, src_rows, skip_page)
    k, v, page_ids, keep = rows_written(k, v, page_ids, src_rows, skip_page)
    for name, x in (("k", k), ("v", v)):
        xf = x.float()
        amax = xf.abs().amax(dim=(2, 3))  # [m, KVH]
        # a tensor divisor: CUDA divides by a Python scalar as a product with its reciprocal
        # (1 ulp off IEEE division for some amax, seen on an H100), the kernel with div_rn
        scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
        put_rows(store[name], page_ids, (xf / scale[:, :, None, None]).to(_FP8), keep)
        put_rows(store[name + "_scale"], page_ids, scale, keep)
