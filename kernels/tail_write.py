"""A decode step's new K/V written into the compressed cache's 16-bit tail, as one Triton launch.

  * ``write_tail``      -- Triton kernel + host wrapper.
  * ``write_tail_ref``  -- pure-torch reference with the same signature (what
                           compress/compressed_cache.py's `_decode` ran before: a stack and one
                           or two index_puts, three small kernels per layer on a GPU).

``write_tail(tail, k, v, slots, col_open, col_sink) -> None`` (in place)
  tail      [2, S, KVH, C, D] one layer's tail (K plane, V plane; S slots, C = n_sink + P + 1
            columns: the sinks, the open page, a junk column), float16 / bfloat16 / float32,
            last dim contiguous (the cache's is contiguous).
  k, v      [B, KVH, D] the step's new keys / values in tail's dtype; strided views are taken as
            they are, but the last dim must be contiguous.
  slots     int32 / int64 [B]: row b's slot (distinct, except the CUDA-graph padding rows, which
            all write the scratch slot: no sequence reads it, and which row wins there is as
            undefined as it is for index_put on a GPU).
  col_open  int32 / int64 [B]: row b's open-page column.
  col_sink  int32 / int64 [B] or None (a codec without sinks): a second column row b also
            writes, its sink column for the first n_sink positions, the junk column C - 1
            otherwise. Never col_open (sink and junk columns lie outside the open page).
  For every row b: tail[0, slots[b], :, c] = k[b] and tail[1, slots[b], :, c] = v[b] for c in
  col_open[b] (and col_sink[b]); nothing else changes. Indices are not range-checked on the
  device (a check would need a host sync, and a decode step is captured in a CUDA graph).

Kernel: grid (B, KVH), one program copies one row's head: its K and V rows [D] (padded to a power
of two in registers, masked) into one or two columns of both planes. A plain copy, so the kernel
equals the reference bit for bit.
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES, describe
from zipserve.kernels.paged_decode_attention import require_runnable

__all__ = ["write_tail", "write_tail_ref"]

INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _write_tail_kernel(
    tail_ptr,  # [2, S, KVH, C, D], last dim contiguous
    k_ptr,  # [B, KVH, D], last dim contiguous
    v_ptr,  # [B, KVH, D], last dim contiguous
    slots_ptr,  # int [B]
    open_ptr,  # int [B]
    sink_ptr,  # int [B] (read when HAS_SINK)
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_tp,  # tail's plane (K -> V)
    stride_ts,  # slot
    stride_th,  # head
    stride_tc,  # column
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SINK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < HEAD_DIM
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs, mask=ok)  # [BLOCK_D]
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs, mask=ok)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    row = tail_ptr + slot * stride_ts + h * stride_th + offs  # column 0 of (K plane, slot, head)
    col = tl.load(open_ptr + b).to(tl.int64)
    tl.store(row + col * stride_tc, k, mask=ok)
    tl.store(row + stride_tp + col * stride_tc, v, mask=ok)
    if HAS_SINK:
        col = tl.load(sink_ptr + b).to(tl.int64)
        tl.store(row + col * stride_tc, k, mask=ok)
        tl.store(row + stride_tp + col * stride_tc, v, mask=ok)


def _check(tail, k, v, slots, col_open, col_sink) -> None:
    """The arguments both paths share (module docstring); ValueError naming the argument. Only
    shapes, dtypes, strides and devices: no value is read (no host sync on a GPU)."""
    if (
        not isinstance(tail, torch.Tensor)
        or tail.dim() != 5
        or tail.shape[0] != 2
        or tail.dtype not in FLOAT_DTYPES
    ):
        raise ValueError(f"tail must be [2, S, KVH, C, D] of {FLOAT_DTYPES}, got {describe(tail)}")
    if tail.numel() and tail.stride(-1) != 1:
        raise ValueError(f"tail must have a contiguous last dim, got strides {tail.stride()}")
    _, _, kvh, _, d = tail.shape
    if not isinstance(k, torch.Tensor) or k.dim() != 3 or tuple(k.shape[1:]) != (kvh, d):
        raise ValueError(f"k must be [B, KVH={kvh}, D={d}], got {describe(k)}")
    b = k.shape[0]
    if not isinstance(v, torch.Tensor) or v.shape != k.shape:
        raise ValueError(f"v must be [B={b}, KVH={kvh}, D={d}] as k, got {describe(v)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != tail.dtype:
            raise ValueError(f"{name} must be tail's {tail.dtype}, got {x.dtype}")
        if x.numel() and x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")
    for name, x in (("slots", slots), ("col_open", col_open), ("col_sink", col_sink)):
        if x is None and name == "col_sink":
            continue
        if not isinstance(x, torch.Tensor) or x.shape != (b,) or x.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 / int64 [B={b}], got {describe(x)}")
    for name, x in (
        ("k", k),
        ("v", v),
        ("slots", slots),
        ("col_open", col_open),
        ("col_sink", col_sink),
    ):
        if x is not None and x.device != tail.device:
            raise ValueError(f"{name} is on {x.device}, tail is on {tail.device}")


def write_tail(tail, k, v, slots, col_open, col_sink) -> None:
    """Write row b's k[b] / v[b] into tail's columns col_open[b] (and col_sink[b]) of slot
    slots[b] (module docstring). One launch, no host sync: CUDA-graph capturable."""
    _check(tail, k, v, slots, col_open, col_sink)
    require_runnable("write_tail", _write_tail_kernel, tail)
    b, kvh, d = k.shape
    if b == 0 or kvh == 0 or d == 0:
        return
    _write_tail_kernel[(b, kvh)](
        tail,
        k,
        v,
        slots,
        col_open,
        col_open if col_sink is None else col_sink,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        tail.stride(0),
        tail.stride(1),
        tail.stride(2),
        tail.stride(3),
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        HAS_SINK=col_sink is not None,
        num_warps=1,
    )


def write_tail_ref(tail, k, v, slots, col_open, col_sink) -> None:
    """torch reference of write_tail (same signature, same writes: two index_puts of the stacked
    K/V, the second only with col_sink)."""
    _check(tail, k, v, slots, col_open, col_sink)
    kv = torch.stack((k, v), 1)  # [B, 2, KVH, D]
    tail[:, slots, :, col_open] = kv
    if col_sink is not None:
        tail[:, slots, :, col_sink] = kv
