"""RMSNorm, optionally fused with the residual add before it, as one Triton launch per call.

  * ``rms_norm``      -- Triton kernel + host wrapper.
  * ``rms_norm_ref``  -- pure-torch reference with the same signature (what engine/model.py ran
                         before: ~9 elementwise kernels per norm on a GPU, one more for the add).

Math (engine/model.py's RMSNorm, rounding where it rounds):
  with a residual r:  s = (x + r) rounded to x's dtype   (the new residual stream)
  without:            s = x
  out = weight * (s * rsqrt(mean(s^2) + eps) in fp32, rounded to x's dtype), rounded to x's dtype.
Returns (out, s): out [..., N] and the residual stream s [..., N] (x itself when there is no
residual).

Layout: x, residual [..., N] with a contiguous last dim (the engine's [T, N] rows may be strided;
other leading dims are flattened, a copy where they cannot be), weight [N] in x's dtype. Kernel: one program per row, the row in one [BLOCK >= N] tile, fp32 sum of squares. The
decode step runs it twice per layer (two norms, one of them taking the attention's residual add)
where torch launched ~20 small kernels: the fused form is what lets a CUDA graph of a decode step
spend its time in matmuls and attention.
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES
from zipserve.kernels.paged_decode_attention import require_runnable

__all__ = ["rms_norm", "rms_norm_ref"]


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]
    r_ptr,  # [T, N] residual (read when HAS_RES)
    w_ptr,  # [N]
    out_ptr,  # [T, N] contiguous
    s_ptr,  # [T, N] contiguous, x + r (written when HAS_RES)
    stride_x,
    stride_r,
    n,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded as torch's add rounds
        tl.store(s_ptr + row * n + offs, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)  # the normalized row, rounded once ...
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + offs, (w * y).to(x.dtype), mask=ok)  # ... and after the weight


def _check(x, weight, eps, residual):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be [..., N] of {FLOAT_DTYPES}, got {getattr(x, 'shape', x)!r}")
    n = x.shape[-1]
    if x.stride(-1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {x.stride()}")
    if not isinstance(weight, torch.Tensor) or weight.shape != (n,) or weight.dtype != x.dtype:
        raise ValueError(
            f"weight must be [{n}] of {x.dtype}, got "
            f"{getattr(weight, 'dtype', None)} {tuple(getattr(weight, 'shape', ()))}"
        )
    if not isinstance(eps, float) or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if residual is not None and (
        not isinstance(residual, torch.Tensor)
        or residual.shape != x.shape
        or residual.dtype != x.dtype
        or residual.stride(-1) != 1
    ):
        raise ValueError(
            f"residual must be {tuple(x.shape)} of {x.dtype} with a contiguous last dim, got "
            f"{getattr(residual, 'dtype', None)} {tuple(getattr(residual, 'shape', ()))}"
        )
    for name, y in (("weight", weight), ("residual", residual)):
        if y is not None and y.device != x.device:
            raise ValueError(f"{name} is on {y.device}, x is on {x.device}")


def rms_norm(x, weight, eps, residual=None):
    """(weight * RMSNorm(s), s) with s = x + residual (or x): module docstring. One launch."""
    _check(x, weight, eps, residual)
    require_runnable("rms_norm", _rms_norm_kernel, x)
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # [T, N]: a view of a 2-D x (strided rows kept), a copy only where
    res = None if residual is None else residual.reshape(-1, n)  # leading dims cannot flatten
    t = rows.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = x if residual is None else torch.empty_like(out)
    if t == 0 or n == 0:
        return out, s
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(t,)](
        rows,
        rows if res is None else res,
        weight,
        out,
        s,
        rows.stride(0),
        rows.stride(0) if res is None else res.stride(0),
        n,
        eps,
        HAS_RES=residual is not None,
        BLOCK=block,
        num_warps=max(1, min(16, block // 256)),
    )
    return out, s


def rms_norm_ref(x, weight, eps, residual=None):
    """torch reference of rms_norm (same signature, same roundings)."""
    _check(x, weight, eps, residual)
    s = x if residual is None else x + residual
    sf = s.float()
    y = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * y, s
