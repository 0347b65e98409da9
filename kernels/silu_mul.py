"""The MLP's gate: silu(gate) * up from the fused gate/up projection, as one Triton launch.

  * ``silu_mul``      -- Triton kernel + host wrapper.
  * ``silu_mul_ref``  -- pure-torch reference with the same signature (engine/model.py's
                         `F.silu(gate) * up`: two kernels and an intermediate on a GPU).

Math, rounding where torch rounds: a = silu(gate) in fp32 rounded to the input's dtype, then
out = a * up in fp32, rounded again. Layout: gate_up [T, 2 I] with a contiguous last dim (gate
its first I columns, up the last I); out [T, I] contiguous. Kernel: grid (T, cdiv(I, BLOCK)).
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES
from zipserve.kernels.paged_decode_attention import require_runnable

__all__ = ["silu_mul", "silu_mul_ref"]

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * inter + offs, (a * up.to(tl.float32)).to(gate.dtype), mask=ok)


def _check(gate_up):
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 2:
        raise ValueError(f"gate_up must be [T, 2 I], got {getattr(gate_up, 'shape', gate_up)!r}")
    if gate_up.dtype not in FLOAT_DTYPES:
        raise ValueError(f"gate_up dtype must be one of {FLOAT_DTYPES}, got {gate_up.dtype}")
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have an even width 2 I, got {gate_up.shape[1]}")
    if gate_up.numel() and gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must have a contiguous last dim, got strides {gate_up.stride()}")


def silu_mul(gate_up):
    """silu(gate) * up of gate_up [T, 2 I] -> [T, I] (module docstring). One launch."""
    _check(gate_up)
    require_runnable("silu_mul", _silu_mul_kernel, gate_up)
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    if t and inter:
        _silu_mul_kernel[(t, triton.cdiv(inter, BLOCK))](
            gate_up, out, gate_up.stride(0), inter, BLOCK=BLOCK, num_warps=4
        )
    return out


def silu_mul_ref(gate_up):
    """torch reference of silu_mul (same signature, same roundings)."""
    _check(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
