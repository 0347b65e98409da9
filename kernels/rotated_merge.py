"""Merge of the HACK decode kernel's partials when its pages live in a rotated basis.

Partial 0 is the dense tail's (model basis), partials 1..S are page splits (basis of K R, V R with R
the codec's orthonormal, symmetric rotation, compress/rotation.py). One program per (sequence, head)
LSE-weights them, rotates the pages' sum back with R and adds the tail's: the output rotation and
the merge in one pass, in fp32, rounded once (and, when asked, the rows' merged log2-sum-exp).
When R is the tensor compress/rotation.py's `hadamard` returned, the rotation is a butterfly in
registers (kernels/hadamard_butterfly.py) instead of a read of R (64 KB per head).
`merge_rotated_ref` is the torch reference.
"""

import math

import torch
import triton
import triton.language as tl

from zipserve.compress.rotation import hadamard_block
from zipserve.kernels.hadamard_butterfly import hadamard_rotate
from zipserve.kernels.head_dim import block_d
from zipserve.kernels.paged_decode_attention import (
    _split_weights,
    _store_merged_lse,
    check_lse_out,
)

_LN2 = math.log(2.0)


@triton.jit
def _add_tail_and_store(o, tail_row, w_tail, inv, out_row, offs, ok):
    """out[offs] = (o + w_tail * tail[offs]) * inv: the rotated pages' columns offs plus the
    tail's (a dead tail, w_tail 0, may hold NaN and is not added), normalised, in out's dtype."""
    tail = tl.load(tail_row + offs, mask=ok, other=0.0)
    o = (o + tl.where(w_tail > 0.0, w_tail * tail, 0.0)) * inv
    tl.store(out_row + offs, o.to(out_row.dtype.element_ty), mask=ok)


@triton.jit
def _merge_rotated_kernel(
    part_ptr,
    lse_ptr,
    rot_ptr,
    out_ptr,  # part f32 [B,H,S1,D], lse f32 [B,H,S1] (log2), rot f32 [D,D], out [B,H,D]
    lse_out_ptr,  # f32 [B,H] (log2), written when WRITE_LSE
    stride_ob,
    stride_oh,
    NUM_PARTS: tl.constexpr,
    S_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_J: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    HADAMARD: tl.constexpr = 0,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row0 = (b * tl.num_programs(1) + h) * NUM_PARTS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    offs_s, live, w, den, m = _split_weights(lse_ptr, row0, NUM_PARTS, S_PAD)
    inv = 1.0 / tl.where(den > 0.0, den, 1.0)
    w_pages = tl.where(offs_s > 0, w, 0.0)
    part = tl.load(
        part_ptr + (row0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=(live & (offs_s > 0))[:, None] & d_ok[None, :],
        other=0.0,
    )  # [S_PAD, BD] page partials
    acc = tl.sum(w_pages[:, None] * part, axis=0)  # [BD] pages' basis
    w_tail = tl.sum(tl.where(offs_s == 0, w, 0.0), axis=0)
    out_row = out_ptr + b * stride_ob + h * stride_oh
    if HADAMARD > 0:  # R is the codec's Hadamard: the butterfly, no R read (64 KB per head)
        o = hadamard_rotate(acc, BLOCK_D, HADAMARD)  # [BD] back in the model's basis
        _add_tail_and_store(o, part_ptr + row0 * HEAD_DIM, w_tail, inv, out_row, offs_d, d_ok)
    else:  # any orthonormal R, read in [BD, BLOCK_J] chunks
        for j0 in tl.static_range(0, BLOCK_D, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            j_ok = offs_j < HEAD_DIM
            r = tl.load(
                rot_ptr + offs_d[:, None] * HEAD_DIM + offs_j[None, :],
                mask=d_ok[:, None] & j_ok[None, :],
                other=0.0,
            )  # [BD, BJ]
            o = tl.sum(acc[:, None] * r, axis=0)  # [BJ] back in the model's basis
            _add_tail_and_store(o, part_ptr + row0 * HEAD_DIM, w_tail, inv, out_row, offs_j, j_ok)
    if WRITE_LSE:
        _store_merged_lse(m, den, lse_out_ptr + b * tl.num_programs(1) + h)


def _check(part, lse, rotation, out):
    b, h, s1, d = part.shape
    if part.dtype != torch.float32 or not part.is_contiguous():
        raise ValueError(f"part: must be contiguous float32 [B, H, S+1, D], got {part.dtype}")
    if lse.shape != (b, h, s1) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse: must be contiguous float32 {(b, h, s1)}, got {tuple(lse.shape)}")
    if rotation.shape != (d, d):
        raise ValueError(f"rotation: must be [{d}, {d}], got {tuple(rotation.shape)}")
    if out.shape != (b, h, d) or out.stride(-1) != 1:
        raise ValueError(f"out: must be [{b}, {h}, {d}] with a contiguous last dim")


def merge_rotated(part, lse, rotation, out, lse_out=None):
    """out [B, H, D] <- (sum_s>0 w_s part_s) R + w_0 part_0, normalised (w = 2^(lse - max));
    with lse_out (contiguous fp32 [B, H]) also each row's merged log2-sum-exp."""
    _check(part, lse, rotation, out)
    b, h, s1, d = part.shape
    check_lse_out(lse_out, b, h, part.device)
    if b == 0 or h == 0:
        return out
    _merge_rotated_kernel[(b, h)](
        part,
        lse,
        rotation.float().contiguous(),
        out,
        lse if lse_out is None else lse_out,
        out.stride(0),
        out.stride(1),
        NUM_PARTS=s1,
        S_PAD=max(2, triton.next_power_of_2(s1)),
        HEAD_DIM=d,
        BLOCK_D=block_d(d),
        BLOCK_J=32,
        WRITE_LSE=lse_out is not None,
        HADAMARD=hadamard_block(rotation) or 0,
        num_warps=4,
    )
    return out


def merged_lse_ref(lse: torch.Tensor) -> torch.Tensor:
    """log2 sum_s 2^lse_s of partials' lse [B, H, S] (log2 units) -> [B, H]; -inf where every
    partial is empty. The torch form of what the merge kernels write to lse_out."""
    return torch.logsumexp(lse * _LN2, dim=-1) / _LN2


def split_weights_ref(lse: torch.Tensor):
    """Partials' lse [B, H, S] (log2 units; -inf: an empty partial) -> (live [B, H, S], the
    partials with scores; w [B, H, S] = 2^(lse - m), 0 where empty; den [B, H, 1] = sum w;
    m [B, H, 1], the largest lse, 0 where every partial is empty): the split merges' weights, the
    torch form of _split_weights."""
    live = lse > float("-inf")
    m = lse.amax(-1, keepdim=True)
    m = torch.where(m > float("-inf"), m, torch.zeros_like(m))
    w = torch.where(live, torch.exp2(lse - m), torch.zeros_like(lse))
    return live, w, w.sum(-1, keepdim=True), m


def merge_rotated_ref(part, lse, rotation, out, lse_out=None):
    """Torch reference of merge_rotated (same signature)."""
    _check(part, lse, rotation, out)
    check_lse_out(lse_out, *part.shape[:2], part.device)
    if lse_out is not None:
        lse_out.copy_(merged_lse_ref(lse))
    live, w, den, _ = split_weights_ref(lse)  # w [B, H, S1], den [B, H, 1]
    safe = torch.where(live[..., None], part, torch.zeros_like(part))
    pages = (w[..., 1:, None] * safe[:, :, 1:]).sum(2) @ rotation.float()  # [B, H, D]
    o = (pages + w[..., :1] * safe[:, :, 0]) / torch.where(den > 0, den, torch.ones_like(den))
    out.copy_(o)
    return out
