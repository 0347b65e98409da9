"""Rotary position embedding of a step's queries and keys in one Triton launch.

  * ``rope_qk``      -- Triton kernel + host wrapper.
  * ``rope_qk_ref``  -- pure-torch reference with the same signature (engine/model.py's rotate-half
                        form, which launched ~20 small kernels per layer on a GPU).

Math (rotate-half, non-interleaved, as Hugging Face's Llama): with x = [x1, x2] (halves of the head
dim D) and c, s = cos, sin [positions, D/2] (fp32 tables),
  out = [x1 c - x2 s, x2 c + x1 s]   in fp32, rounded to x's dtype.

Layout: positions int [T]; q [T, H, D] and k [T, KVH, D] (None: queries only), last dim contiguous,
other strides free (views of the fused qkv projection); cos, sin fp32 [P, D/2] contiguous.
Returns new contiguous tensors (q_out, k_out) (k_out None without k). Kernel: one program per token,
its H query heads as one [H_PAD, D/2] tile pair and its KVH key heads as another.
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES
from zipserve.kernels.paged_decode_attention import require_runnable

__all__ = ["rope_qk", "rope_qk_ref"]


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_h,
    out_ptr,
    c,
    s,
    NH: tl.constexpr,
    NH_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """One token's NH heads at x_ptr (head stride stride_h) rotated by c, s [HALF_PAD] into the
    contiguous [NH, 2 * HALF] at out_ptr."""
    offs_h = tl.arange(0, NH_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    ok = (offs_h < NH)[:, None] & (offs_d < HALF)[None, :]
    src = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0)
    x2 = tl.load(src + HALF, mask=ok, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    dst = out_ptr + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(dst, (f1 * c[None, :] - f2 * s[None, :]).to(x1.dtype), mask=ok)
    tl.store(dst + HALF, (f2 * c[None, :] + f1 * s[None, :]).to(x1.dtype), mask=ok)


@triton.jit
def _rope_qk_kernel(
    pos_ptr,  # int [T]
    q_ptr,  # [T, H, D]
    k_ptr,  # [T, KVH, D] (read when HAS_K)
    cos_ptr,
    sin_ptr,  # fp32 [P, D/2]
    qo_ptr,  # [T, H, D] contiguous
    ko_ptr,  # [T, KVH, D] contiguous
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    H: tl.constexpr,
    H_PAD: tl.constexpr,
    KVH: tl.constexpr,
    KVH_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HAS_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    d_ok = offs_d < HALF
    c = tl.load(cos_ptr + pos * HALF + offs_d, mask=d_ok, other=0.0)  # [HALF_PAD] fp32
    s = tl.load(sin_ptr + pos * HALF + offs_d, mask=d_ok, other=0.0)
    _rotate_heads(
        q_ptr + t * stride_qt,
        stride_qh,
        qo_ptr + t * (H * 2 * HALF),
        c,
        s,
        H,
        H_PAD,
        HALF,
        HALF_PAD,
    )
    if HAS_K:
        _rotate_heads(
            k_ptr + t * stride_kt,
            stride_kh,
            ko_ptr + t * (KVH * 2 * HALF),
            c,
            s,
            KVH,
            KVH_PAD,
            HALF,
            HALF_PAD,
        )


def _check(positions, q, k, cos, sin):
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be [T, H, D] of {FLOAT_DTYPES}, got {getattr(q, 'shape', q)!r}")
    t, _, d = q.shape
    if d % 2:
        raise ValueError(f"q head dim must be even, got {d}")
    if not isinstance(positions, torch.Tensor) or positions.shape != (t,):
        raise ValueError(f"positions must be [T={t}], got {getattr(positions, 'shape', positions)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if k is not None and (
        not isinstance(k, torch.Tensor)
        or k.dim() != 3
        or k.shape[0] != t
        or k.shape[2] != d
        or k.dtype != q.dtype
    ):
        raise ValueError(
            f"k must be [T={t}, KVH, D={d}] of {q.dtype}, got "
            f"{getattr(k, 'dtype', None)} {tuple(getattr(k, 'shape', ()))}"
        )
    for name, tab in (("cos", cos), ("sin", sin)):
        if (
            not isinstance(tab, torch.Tensor)
            or tab.dim() != 2
            or tab.shape[1] != d // 2
            or tab.dtype != torch.float32
            or not tab.is_contiguous()
        ):
            raise ValueError(
                f"{name} must be contiguous float32 [P, D/2={d // 2}], got "
                f"{getattr(tab, 'dtype', None)} {tuple(getattr(tab, 'shape', ()))}"
            )
    for name, x in (("q", q), ("k", k)):
        if x is not None and x.numel() and x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")
    for name, x in (("positions", positions), ("k", k), ("cos", cos), ("sin", sin)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q is on {q.device}")


def rope_qk(positions, q, k, cos, sin):
    """(q_out, k_out): q and k rotated to their positions (module docstring). One launch."""
    _check(positions, q, k, cos, sin)
    require_runnable("rope_qk", _rope_qk_kernel, q)
    t, h, d = q.shape
    q_out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    k_out = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    kvh = 1 if k is None else k.shape[1]
    half = d // 2
    _rope_qk_kernel[(t,)](
        positions,
        q,
        q if k is None else k,
        cos,
        sin,
        q_out,
        q_out if k is None else k_out,
        q.stride(0),
        q.stride(1),
        q.stride(0) if k is None else k.stride(0),
        q.stride(1) if k is None else k.stride(1),
        H=h,
        H_PAD=triton.next_power_of_2(h),
        KVH=kvh,
        KVH_PAD=triton.next_power_of_2(kvh),
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        HAS_K=k is not None,
        num_warps=4,
    )
    return q_out, k_out


def _rotate_ref(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)  # [T, h, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_qk_ref(positions, q, k, cos, sin):
    """torch reference of rope_qk (same signature, same math in fp32)."""
    _check(positions, q, k, cos, sin)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D/2]
    return _rotate_ref(q, c, s), None if k is None else _rotate_ref(k, c, s)
