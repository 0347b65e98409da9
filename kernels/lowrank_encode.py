"""Low-rank page encoder: post-RoPE 16-bit (or fp32) K/V pages -> pages of their projections.

  * ``lowrank_encode_pages``      -- Triton kernel + host wrapper.
  * ``lowrank_encode_pages_ref``  -- pure-torch fp32 reference with the same signature.

``lowrank_encode_pages(k, v, k_basis, v_basis, out_k, out_v, page_ids, src_rows=None,
skip_page=None, v_cols=None, skip_ids=None) -> (out_k, out_v)``
  k, v        [n, KVH, P, D] full pages (float16 / bfloat16 / float32, last dim contiguous), K after RoPE.
  k_basis     float32 [KVH, D, RK]   keys are stored as k @ k_basis (calibrate.py's k_enc).
  v_basis     float32 [KVH, D, RV]   values are stored as v @ v_basis (v_enc); or None when v is
              already projected (the open page keeps V reduced, zero padded to D): its first
              min(D, WV, v_cols) columns are stored as they are, zeros past them (sealing a filled
              open page: its V in the completed basis, whose first r_v columns a page keeps).
  out_k       [N, KVH, P, WK] (float16 / float32, contiguous) with WK >= RK: input page i goes to
              pool page page_ids[i]; columns RK..WK-1 are written as zeros (a zero-padded width, the
              form the HACK encoder takes for ``lowrank+hack``).  out_v likewise with RV <= WV.
  page_ids    int32 / int64 [m] distinct pool page ids (not range-checked by the kernel), except
              for skip_page, which may repeat.
  src_rows    optional int32 [m]: page i is row src_rows[i] of k / v (read in place: a decode
              step's open pages); default row i (then m == n).
  skip_page   optional page id whose programs write nothing (the engine's scratch page: the rows
              of a decode step that fill no page; the grid stays the batch, CUDA-graph safe).
  skip_ids    optional int32 / int64 [m]: what skip_page is compared with (default page_ids):
              ``lowrank+hack`` writes scratch rows 0..m-1 and skips by the pool pages they stand
              for, with no per-step torch.where to mark them.

Kernel: one program per (page, kv head) loads the [P, D] K and V tiles once, takes the two
[P, D] x [D, R] products on the tensor cores in ``tf32x3`` (three tf32 products: fp32 accuracy;
``ieee`` compiled to 32 registers and ~9 KB of stack per thread for sm_90, 150 us for 8 pages) and
writes the reduced tiles.  Any even head_dim in [8, 256]: the tiles are the next power of
two >= 16 wide with channels >= D masked (kernels/head_dim.py).  This is the "K projected after RoPE in the kernel that
stores it" of the ZeroC design; ``lowrank+hack`` quantizes the kernel's fp32 output with
hack_encode (two launches, see compress/lowrank.py).
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import (
    FLOAT_DTYPES,
    check_page_ids,
    kernel_rows,
    page_strides,
    pages_read,
    put_rows,
    rows_written,
)
from zipserve.kernels.head_dim import block_d, head_dim_error, head_dim_ok
from zipserve.kernels.paged_decode_attention import is_interpreted, require_runnable

__all__ = ["lowrank_encode_pages", "lowrank_encode_pages_ref"]

_OUT = (torch.float16, torch.float32)


@triton.jit
def _project_store(
    x,
    basis_ptr,
    out_ptr,
    row,
    h,
    offs_t,
    offs_d,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    C_PAD: tl.constexpr,
    PREC: tl.constexpr,
):
    """x [P, BD] fp32 (channels >= D zero) -> store x @ basis[h] [P, R] (zeros up to W) into
    pool row `row`."""
    offs_c = tl.arange(0, C_PAD)
    b = tl.load(
        basis_ptr + h * (HEAD_DIM * R) + offs_d[:, None] * R + offs_c[None, :],
        mask=(offs_d < HEAD_DIM)[:, None] & (offs_c < R)[None, :],
        other=0.0,
    )  # [BD, C_PAD], zero rows past D and columns past R
    y = tl.dot(x, b, input_precision=PREC)  # [P, C_PAD]
    tl.store(
        out_ptr + row * (PAGE * W) + offs_t[:, None] * W + offs_c[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=(offs_c < W)[None, :],
    )


@triton.jit
def _lowrank_encode_kernel(
    k_ptr,
    v_ptr,
    ids_ptr,
    kb_ptr,
    vb_ptr,
    ok_ptr,
    ov_ptr,  # inputs strided, bases/pools contiguous
    src_ptr,  # [m] int32 input row of page i
    skip_ptr,  # [m] what skip is compared with (page_ids unless the caller gives skip_ids)
    skip,  # page id whose programs return at once (-1: none)
    stride_kn,
    stride_kh,
    stride_kt,
    stride_vn,
    stride_vh,
    stride_vt,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RK: tl.constexpr,
    RV: tl.constexpr,
    WK: tl.constexpr,
    WV: tl.constexpr,
    CK_PAD: tl.constexpr,
    CV_PAD: tl.constexpr,
    V_PROJ: tl.constexpr,
    V_COLS: tl.constexpr,
    PREC: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(ids_ptr + i).to(tl.int64)
    if tl.load(skip_ptr + i).to(tl.int64) != skip:  # rows sealing into the scratch page: nothing
        row = page * tl.num_programs(1) + h  # (page, head) row in the pool
        src = tl.load(src_ptr + i).to(tl.int64)  # the input row
        offs_t = tl.arange(0, PAGE)
        offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
        d_ok = (offs_d < HEAD_DIM)[None, :]
        k = tl.load(
            k_ptr + src * stride_kn + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :],
            mask=d_ok,
            other=0.0,
        ).to(tl.float32)  # [P, BD]
        _project_store(
            k, kb_ptr, ok_ptr, row, h, offs_t, offs_d, HEAD_DIM, PAGE, RK, WK, CK_PAD, PREC
        )
        if V_PROJ:
            v = tl.load(
                v_ptr
                + src * stride_vn
                + h * stride_vh
                + offs_t[:, None] * stride_vt
                + offs_d[None, :],
                mask=d_ok,
                other=0.0,
            ).to(tl.float32)  # [P, BD]
            _project_store(
                v, vb_ptr, ov_ptr, row, h, offs_t, offs_d, HEAD_DIM, PAGE, RV, WV, CV_PAD, PREC
            )
        else:  # already reduced: copy the first WV columns (zeros past V_COLS)
            offs_c = tl.arange(0, CV_PAD)
            v = tl.load(
                v_ptr
                + src * stride_vn
                + h * stride_vh
                + offs_t[:, None] * stride_vt
                + offs_c[None, :],
                mask=(offs_c < V_COLS)[None, :],
                other=0.0,
            )  # [P, CV_PAD]
            tl.store(
                ov_ptr + row * (PAGE * WV) + offs_t[:, None] * WV + offs_c[None, :],
                v.to(ov_ptr.dtype.element_ty),
                mask=(offs_c < WV)[None, :],
            )


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check(k, v, k_basis, v_basis, out_k, out_v, page_ids, src_rows=None, skip_ids=None):
    """Validate arguments; returns (m, KVH, P, D, RK, RV), m the pages written.  Raises ValueError
    naming the argument."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be [n, KVH, P, D] of {FLOAT_DTYPES}, got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    n, kvh, p, d = k.shape
    if not (_pow2(p) and p >= 16):
        raise ValueError(f"k page_size must be a power of two >= 16, got {p}")
    if not head_dim_ok(d):
        raise ValueError(head_dim_error(d, "k head_dim"))
    ranks = []
    for name, b, out in (("k_basis", k_basis, out_k), ("v_basis", v_basis, out_v)):
        if b is None and name == "v_basis":  # v already projected
            if (
                out.dim() != 4
                or out.shape[1:3] != (kvh, p)
                or out.dtype not in _OUT
                or not out.is_contiguous()
            ):
                raise ValueError(
                    f"out_v must be contiguous [N, KVH={kvh}, P={p}, W] of {_OUT}, got "
                    f"{out.dtype} {tuple(out.shape)}"
                )
            if out.device != k.device:
                raise ValueError(f"out_v is on {out.device}, k is on {k.device}")
            ranks.append(None)
            continue
        if (
            not isinstance(b, torch.Tensor)
            or b.dtype != torch.float32
            or b.dim() != 3
            or b.shape[:2] != (kvh, d)
            or not b.is_contiguous()
        ):
            raise ValueError(
                f"{name} must be contiguous float32 [KVH={kvh}, D={d}, R], got {b.dtype} "
                f"{tuple(b.shape)}"
            )
        r = b.shape[2]
        oname = "out_" + name[0]
        if (
            out.dim() != 4
            or out.shape[1:3] != (kvh, p)
            or out.shape[3] < r
            or out.dtype not in _OUT
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"{oname} must be contiguous [N, KVH={kvh}, P={p}, W>={r}] of {_OUT}, got "
                f"{out.dtype} {tuple(out.shape)}"
            )
        for t, tn in ((b, name), (out, oname)):
            if t.device != k.device:
                raise ValueError(f"{tn} is on {t.device}, k is on {k.device}")
        ranks.append(r)
    n = pages_read(k, src_rows)
    check_page_ids(page_ids, n, k.device)
    if skip_ids is not None:
        check_page_ids(skip_ids, n, k.device, name="skip_ids")
    return n, kvh, p, d, ranks[0], ranks[1]


def _v_cols(d: int, v_cols: int | None) -> int:
    """Leading columns of an already projected V that a page keeps (zeros past them)."""
    if v_cols is not None and not 1 <= v_cols <= d:
        raise ValueError(f"v_cols must be in [1, head_dim={d}], got {v_cols}")
    return d if v_cols is None else v_cols


def lowrank_encode_pages(
    k,
    v,
    k_basis,
    v_basis,
    out_k,
    out_v,
    page_ids,
    src_rows=None,
    skip_page=None,
    v_cols=None,
    skip_ids=None,
):
    """Project full pages onto the bases and write them into the pools (module docstring)."""
    n, kvh, p, d, rk, rv = _check(
        k, v, k_basis, v_basis, out_k, out_v, page_ids, src_rows, skip_ids
    )
    cols = _v_cols(d, v_cols)
    require_runnable("lowrank_encode_pages", _lowrank_encode_kernel, k)
    if n == 0:
        return out_k, out_v
    wk, wv = out_k.shape[3], out_v.shape[3]
    src, skip = kernel_rows(src_rows, skip_page, n, k.device)
    _lowrank_encode_kernel[(n, kvh)](
        k,
        v,
        page_ids.contiguous(),
        k_basis,
        k_basis if v_basis is None else v_basis,
        out_k,
        out_v,
        src,
        page_ids.contiguous() if skip_ids is None else skip_ids.contiguous(),
        skip,
        *page_strides(k, v),
        PAGE=p,
        HEAD_DIM=d,
        BLOCK_D=block_d(d),
        RK=rk,
        RV=rv or 1,
        WK=wk,
        WV=wv,
        CK_PAD=max(16, triton.next_power_of_2(wk)),
        CV_PAD=max(16, triton.next_power_of_2(wv)),
        V_PROJ=rv is not None,
        V_COLS=cols,
        PREC="ieee" if is_interpreted(_lowrank_encode_kernel) else "tf32x3",
        num_warps=4,
    )
    return out_k, out_v


def lowrank_encode_pages_ref(
    k,
    v,
    k_basis,
    v_basis,
    out_k,
    out_v,
    page_ids,
    src_rows=None,
    skip_page=None,
    v_cols=None,
    skip_ids=None,
):
    """fp32 torch reference: out[page_ids] = pad(x @ basis) for K and V."""
    _check(k, v, k_basis, v_basis, out_k, out_v, page_ids, src_rows, skip_ids)
    cols = _v_cols(k.shape[-1], v_cols)
    k, v, ids, keep = rows_written(k, v, page_ids, src_rows, skip_page, skip_ids)
    ids = ids.long()
    for x, b, out in ((k, k_basis, out_k), (v, v_basis, out_v)):
        # [m, KVH, P, R] projected (or already reduced: its first v_cols), then zero padded / cut
        # to [m, KVH, P, W]
        y = x.float()[..., :cols] if b is None else torch.einsum("nhpd,hdr->nhpr", x.float(), b)
        w = out.shape[3]
        y = y[..., :w] if y.shape[3] >= w else torch.nn.functional.pad(y, (0, w - y.shape[3]))
        put_rows(out, ids, y, keep)
    return out_k, out_v
