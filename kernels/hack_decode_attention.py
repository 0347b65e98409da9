"""Decode attention (one query token per sequence) directly on HACK 2/4-bit KV pages.

``hack_decode_attention`` (Triton kernel + wrapper; GQA, flash-decoding splits, CUDA-graph safe),
``hack_decode_attention_ref`` (torch fp32, same signature, same math), ``hack_num_splits`` (heuristic).
Layout of ``pages``: hack_layout.py (P = page_size, E = 8 // bits, DE = D // E, GV = group_v,
h = (2^b - 1) / 2).
  q [B, H, D] fp16/bf16/fp32 (head h uses kv head h // G); page_table [B, max_pages] int32;
  n_pages [B] int32: full quantized pages of sequence b (positions [0, n_pages * P));
  dense_k/v [R, KVH, T, D] (q's dtype): the 16-bit tail, sinks + open-page tokens in any order, of
  sequence b in row dense_rows[b] (default b) from column dense_start[b] (default 0), read in place;
  dense_lens [B] int32 (<= T - dense_start[b]); rotation: optional [D, D] (see the wrapper).
Attended set of sequence b: quantized positions n_sink <= pos < n_pages[b] * P plus dense_lens[b] dense
tokens -- the caller keeps positions [0, n_sink) in the dense tail and quantized page 0's first n_sink slots
are masked.  With L tokens: n_pages = L // P, dense = positions [0, min(n_sink, L)) + [n_pages * P, L) (just
[0, L) when L < P).  n_pages = dense_lens = 0 is a padding row (zeros out).

The Triton kernel and the math it computes: hack_decode_kernel.py. The CUDA backend:
hack_decode_cuda.py (selected by ``backend`` / $ZIPSERVE_HACK_DECODE, ``resolve_backend``).
"""

import os

import torch
import triton

from zipserve.compress.rotation import hadamard_block
from zipserve.kernels import hack_decode_cuda
from zipserve.kernels.hack_decode_kernel import _LOG2E, _hack_decode_kernel
from zipserve.kernels.hack_decode_reference import hack_decode_attention_ref
from zipserve.kernels.hack_layout import check_decode_args, hack_bytes_per_token
from zipserve.kernels.head_dim import block_d
from zipserve.kernels.paged_decode_attention import (
    is_interpreted,
    merge_splits,
    require_runnable,
    split_buffers,
)
from zipserve.kernels.rotated_merge import merge_rotated

__all__ = [
    "hack_decode_attention",
    "hack_decode_attention_ref",
    "hack_num_splits",
    "hack_bytes_per_token",
]


def plane_width(head_dim: int, bits: int) -> int:
    """DEP: the power-of-two tile width (>= 16, the smallest tl.dot K) of a plane of D / E channels."""
    return block_d(head_dim * bits // 8)


def _launch_config(group: int, page_size: int, head_dim: int, bits: int):
    """Fixed heuristic (no autotune) -> (NP pages per step, GP padded group, num_warps, num_stages).

    From sm_90 SASS of this kernel (instructions per token, registers, spills): steps of <= 256 tokens with
    code tiles <= 64 Kbit, M = NP * GP ~ 16, 4 warps so PV outputs aren't warp-replicated.
    A padded plane (DEP > DE) counts at its padded width. Planes of 16 bytes (head_dim 64 at 2 bits,
    lowrank+hack2's width-64 pages) run 1 warp and 2 stages: on an H100 at 8 x 8k that took 46.8 us
    per layer against 88.8 at 2 warps / 3 stages (bench/diag/hack64_configs.py,
    bench/results/session21_h100/call2/hack64.log).
    """
    de = plane_width(head_dim, bits)
    max_tokens = min(256, 65536 // (de * 8)) if de >= 32 else 128
    gp = triton.next_power_of_2(group)
    np_ = max(1, min(max_tokens // page_size, 16 // gp))
    gp = max(gp, triton.cdiv(16, np_))  # M >= 16 for the MMA tile
    return (np_, gp, 4, 3) if de >= 32 else (np_, gp, 1, 2)


def hack_num_splits(
    batch: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int = 132,
    backend: str = "triton",
    bits: int = 2,
    head_dim: int = 128,
) -> int:
    """Page splits for a launch.  Triton: splits that fill one wave of resident programs; at 4 warps
    the kernel keeps 2 programs per SM (255 registers; ncu on an H200,
    bench/results/hack_tune_h200.log), and a second, partial wave cost 12% at 8 x 32k; a program of
    1 warp (planes narrower than 32 bytes: head_dim 64 at 2 bits, lowrank+hack2's pages) leaves
    room for 8 (16 splits at 8 x 8k, the fastest on an H100, session 21); no split shorter than 1024
    tokens (512 at 1 warp) (compressed pages are cheap).
    CUDA (a resolved backend): kernels/hack_decode_cuda.py's cuda_num_splits (bits: the pages', which
    set the shared memory some variants hold per warp)."""
    if backend == "cuda":
        return hack_decode_cuda.cuda_num_splits(batch, num_kv_heads, max_seq_len, num_sms, bits)
    programs = max(1, batch * num_kv_heads)
    warps = _launch_config(1, 64, head_dim, bits)[2]
    resident = 8 // warps  # programs of 255 registers an SM holds (65536 / (255 * 32 * warps))
    min_split = 512 if warps == 1 else 1024  # 1 warp: 16 x 512 beat 8 x 1024 by 7% (hack64.log)
    return int(max(1, min((resident * num_sms) // programs, max(1, max_seq_len // min_split), 64)))


def _kernel_is_interpreted() -> bool:
    return is_interpreted(_hack_decode_kernel)


def hack_decode_attention(
    q,
    pages,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    bits,
    n_sink=4,
    num_splits=1,
    mode="f16",
    out=None,
    dense_rows=None,
    dense_start=None,
    rotation=None,
    backend="auto",
    return_lse=False,
    return_partials=False,
):
    """Decode attention on HACK pages + a dense tail.  Shapes: module docstring.  Returns out [B, H, D].

    num_splits page splits run beside one program per (sequence, KV head) for the dense tail, which
    reads row dense_rows[b] of dense_k/v from column dense_start[b] in place (defaults: b, 0).  With
    rotation R [D, D] (orthonormal, symmetric) the pages hold codes of K R and V R while q, the tail
    and the output stay in the model's basis: the pages see q R, the tail q, and the merge rotates
    the pages' partial output back (kernels/rotated_merge.py).

    backend: "triton" (this module's kernel), "cuda" (page splits on tensor cores,
    kernels/hack_decode_cuda.py; ValueError where it cannot run) or "auto" (resolve_backend).
    return_lse: (out, lse) with lse [B, H] fp32 the log2-sum-exp2 of each row's scores in log2 units
    (-inf for a padding row), for merging with attention computed elsewhere.
    return_partials: (part [B, H, 1 + S, D], lse [B, H, 1 + S]) fp32 instead, the tail program's
    and the page splits' partials unmerged (each normalized; lse log2, -inf: empty, its part
    unwritten), for a caller that merges them itself (kernels/lowrank_tail_merge.py); not with
    rotation, whose merge rotates the pages' partials back."""
    if return_partials and (rotation is not None or return_lse or out is not None):
        raise ValueError("return_partials: not with rotation, return_lse or out")
    B, H, KVH, P, D = check_decode_args(
        q,
        pages,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        bits,
        n_sink,
        num_splits,
        mode,
        out,
        dense_rows,
        dense_start,
        rotation,
    )
    require_runnable("hack_decode_attention", _hack_decode_kernel, q)
    backend = resolve_backend(
        backend,
        q.device,
        head_dim=D,
        page_size=P,
        bits=pages.bits,
        group_v=pages.group_v,
        group=H // KVH,
        mode=mode,
    )
    if out is None:
        out = torch.empty_like(q)
    if B == 0 or H == 0:
        if return_partials:
            return q.new_zeros((B, H, num_splits + 1, D)), q.new_zeros((B, H, num_splits + 1))
        return (out, q.new_zeros((B, H), dtype=torch.float32)) if return_lse else out
    rows, start = tail_index(q, dense_rows, dense_start)
    # q_pages [B, H, D]: the pages' query, rotated in fp32 and kept so (the kernels read q as fp32).
    # With the CUDA kernel the Triton launch's tail programs write it (one launch fewer than a
    # cast and a matmul); the Triton page programs need it before they start, so torch makes it.
    rotate_in_tail = backend == "cuda" and rotation is not None
    if rotate_in_tail:
        rotation = rotation.float().contiguous()
        q_pages = torch.empty((B, H, D), dtype=torch.float32, device=q.device)
    elif rotation is not None:
        q_pages = q.float() @ rotation.float()
    else:
        q_pages = q.float().contiguous() if backend == "cuda" else q
    part, lse = split_buffers(q, out, num_splits + 1)
    # the Triton kernel: the tail (program split 0), and the page splits 1..S unless the CUDA
    # kernel takes them on tensor cores
    _launch_triton(
        q_pages,
        q,
        pages,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        rows,
        start,
        part,
        lse,
        scale,
        n_sink,
        num_splits,
        mode,
        programs=1 if backend == "cuda" else num_splits + 1,
        rotation=rotation if rotate_in_tail else None,
    )
    if backend == "cuda":
        hack_decode_cuda.launch_page_splits(
            q_pages,
            pages,
            page_table,
            n_pages,
            part,
            lse,
            float(scale) * _LOG2E,
            n_sink,
            num_splits,
        )
    if return_partials:
        return part, lse
    # log2 sum_s 2^lse_s over the 1 + S partials, written by the merge itself
    lse_out = torch.empty((B, H), dtype=torch.float32, device=q.device) if return_lse else None
    if rotation is None:
        merge_splits(part, lse, out, lse_out)
    else:
        merge_rotated(part, lse, rotation, out, lse_out)
    return (out, lse_out) if return_lse else out


BACKENDS = ("auto", "triton", "cuda")
BACKEND_ENV = "ZIPSERVE_HACK_DECODE"


def resolve_backend(
    backend: str,
    device: torch.device,
    *,
    head_dim: int,
    page_size: int,
    bits: int,
    group_v: int,
    group: int | None,
    mode: str = "f16",
) -> str:
    """ "triton" or "cuda" for calls on device with this geometry.  "auto" reads
    $ZIPSERVE_HACK_DECODE (auto | triton | cuda; default auto) and, for auto, takes the CUDA kernel
    wherever it can run (H100, session 8: 1.6-2.2x SDPA where Triton ran 1.1-1.2x).  An explicit "cuda" that cannot run raises ValueError with the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    geometry = dict(
        head_dim=head_dim, page_size=page_size, bits=bits, group_v=group_v, group=group, mode=mode
    )
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            ok = hack_decode_cuda.unsupported_reason(device, **geometry) is None
            return "cuda" if ok else "triton"
    if backend == "cuda":
        reason = hack_decode_cuda.unsupported_reason(device, **geometry)
        if reason is not None:
            raise ValueError(f"backend 'cuda' cannot run here: {reason}")
    return backend


def _launch_triton(
    q_pages,
    q,
    pages,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    rows,
    start,
    part,
    lse,
    scale,
    n_sink,
    num_splits,
    mode,
    programs,
    rotation=None,
):
    """The Triton kernel over programs (sequence, KV head, split < programs) of 1 + num_splits.
    rotation R (fp32 [D, D], contiguous): the tail programs also write q R into q_pages (fp32
    [B, H, D], contiguous) for the CUDA kernel's page splits."""
    B, H, D = q.shape
    KVH, P = pages.num_kv_heads, pages.page_size
    G = H // KVH
    np_, gp, num_warps, num_stages = _launch_config(G, P, D, pages.bits)
    _hack_decode_kernel[(B, KVH, programs)](
        q_pages,
        pages.k_codes,
        pages.v_codes,
        pages.k_scale,
        pages.k_min,
        pages.v_scale,
        pages.v_min,
        pages.v_sums,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        q,
        rows,
        start,
        part,
        lse,
        lse if rotation is None else rotation,
        lse if rotation is None else q_pages,
        float(scale) * _LOG2E,
        n_sink,
        q_pages.stride(0),
        q_pages.stride(1),
        q.stride(0),
        q.stride(1),
        page_table.stride(0),
        *dense_k.stride()[:3],
        *dense_v.stride()[:3],
        G=G,
        GP=gp,
        NP=np_,
        PAGE=P,
        HEAD_DIM=D,
        BLOCK_D=block_d(D),
        DEP=plane_width(D, pages.bits),
        BITS=pages.bits,
        GV=pages.group_v,
        NUM_SPLITS=num_splits,
        INT8=mode == "int8",
        INT8_QK_DOT=plane_width(D, pages.bits) >= 32,
        DENSE_BLOCK=64,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        FAST=q.is_cuda and torch.version.hip is None and not _kernel_is_interpreted(),
        WRITE_QROT=rotation is not None,
        QROT_HADAMARD=0 if rotation is None else (hadamard_block(rotation) or 0),
        num_warps=num_warps,
        num_stages=num_stages,
    )


def tail_index(q, dense_rows, dense_start):
    """(rows [B] int32, start [B] int32): the dense tail's row and first column per sequence
    (defaults: row b, column 0)."""
    b = q.shape[0]
    rows = torch.arange(b, dtype=torch.int32, device=q.device) if dense_rows is None else dense_rows
    start = (
        torch.zeros(b, dtype=torch.int32, device=q.device) if dense_start is None else dense_start
    )
    return rows, start
