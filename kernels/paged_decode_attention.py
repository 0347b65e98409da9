"""Paged decode attention (one query token per sequence) over a paged KV cache.

This module owns:
  * ``paged_decode_attention``      -- Triton kernel + host wrapper (GQA, flash-decoding splits).
  * ``paged_decode_attention_ref``  -- pure-torch fp32 reference with the same signature.
  * ``choose_num_splits``           -- small host heuristic for the flash-decoding split count.

KV cache layout (one layer): ``k_cache``/``v_cache`` are ``[num_pages, num_kv_heads, page_size, head_dim]``.
``page_table[b, i]`` is the physical page holding tokens ``[i*page_size, (i+1)*page_size)`` of sequence ``b``;
entries past ``cdiv(seq_lens[b], page_size)`` are never read.  ``seq_lens[b] == 0`` marks a padding row
(output zeros, no cache reads).

Kernel design: grid = (B, num_kv_heads, num_splits).  Each program owns all G = num_heads // num_kv_heads
query heads of one kv head (a ``[G_PAD, D]`` tile so ``tl.dot`` gets M >= 16) and streams one contiguous,
page-aligned chunk of the sequence in blocks of BLOCK_N tokens (BLOCK_N may span several pages: a vector
of page ids is gathered from the page table per block).  Online softmax runs in the log2 domain (log2(e) is
folded into the scale).  With num_splits > 1 every program writes a normalised partial output plus its
log2-sum-exp, and a second small kernel merges the splits.  Nothing depends on host-side values of
``seq_lens``, so the wrapper is CUDA-graph capturable.  Any even head_dim in [8, 256] (kernels/head_dim.py):
tiles are BLOCK_D = next power of two >= max(16, D) wide and channels >= D are masked on every load and store.
"""

import math

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES, is_pow2
from zipserve.kernels.head_dim import block_d, head_dim_error, head_dim_ok

__all__ = ["paged_decode_attention", "paged_decode_attention_ref", "choose_num_splits"]

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pt_ptr,
    lens_ptr,  # q [B,H,D], k/v [P,KVH,PS,D], pt [B,MP] i32, lens [B] i32
    out_ptr,
    part_ptr,
    lse_ptr,  # out [B,H,D], part f32 [B,H,S,D], lse f32 [B,H,S]
    qk_scale,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_kt,
    stride_vp,
    stride_vh,
    stride_vt,
    stride_ptb,
    stride_ob,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * G

    offs_g = tl.arange(0, G_PAD)  # [G_PAD] query head within the group
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask_g = offs_g < G
    heads = kvh * G + offs_g  # [G_PAD] global query head ids

    # q tile [G_PAD, BD]; padded rows and channels are zeros.
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & d_ok[None, :],
        other=0.0,
    )

    # This split's token range [lo, hi): contiguous chunks of CHUNK tokens (CHUNK is a multiple of
    # page_size and BLOCK_N), so splits are page aligned.  Empty when the split is past the end.
    seq_len = tl.load(lens_ptr + b)
    chunks_per_split = tl.cdiv(tl.cdiv(seq_len, CHUNK), NUM_SPLITS)
    lo = split * chunks_per_split * CHUNK
    hi = tl.minimum(lo + chunks_per_split * CHUNK, seq_len)

    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    pt_row = pt_ptr + b * stride_ptb

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([G_PAD], tl.float32)  # running denominator
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)  # running numerator
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n  # [BLOCK_N] logical token positions
        valid = tok < hi
        page = tl.load(pt_row + tok // PAGE_SIZE, mask=valid, other=0).to(tl.int64)  # [BLOCK_N]
        slot = tok % PAGE_SIZE
        kv_ok = valid[:, None] & d_ok[None, :]
        k = tl.load(
            k_base + (page * stride_kp + slot * stride_kt)[:, None] + offs_d[None, :],
            mask=kv_ok,
            other=0.0,
        )  # [BLOCK_N, BD]
        v = tl.load(
            v_base + (page * stride_vp + slot * stride_vt)[:, None] + offs_d[None, :],
            mask=kv_ok,
            other=0.0,
        )  # [BLOCK_N, BD]

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [G_PAD, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has >= 1 valid token
        alpha = tl.exp2(m_i - m_new)  # [G_PAD]
        p = tl.exp2(s - m_new[:, None])  # [G_PAD, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # [G_PAD, BD]; zeros for an empty range
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=mask_g[:, None] & d_ok[None, :],
        )
    else:
        row = (b * num_heads + heads) * NUM_SPLITS + split  # [G_PAD] row in part/lse
        tl.store(
            part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
            o,
            mask=mask_g[:, None] & d_ok[None, :],
        )
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=mask_g)


@triton.jit
def _split_weights(lse_ptr, row0, NUM: tl.constexpr, S_PAD: tl.constexpr):
    """The NUM partials of one (sequence, head) row starting at row0: (offs_s [S_PAD], live
    [S_PAD], w [S_PAD] = exp2(lse - m), 0 where a partial is empty or padding, den = sum w, m the
    max lse, 0 when all are empty). Shared by the merges (this one and kernels/rotated_merge.py)."""
    offs_s = tl.arange(0, S_PAD)
    lse = tl.load(lse_ptr + row0 + offs_s, mask=offs_s < NUM, other=float("-inf"))  # [S_PAD]
    live = lse > float("-inf")  # empty splits (and padding rows) contribute nothing
    m = tl.max(lse, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)
    w = tl.where(live, tl.exp2(lse - m), 0.0)  # [S_PAD]
    return offs_s, live, w, tl.sum(w, axis=0), m


@triton.jit
def _store_merged_lse(m, den, lse_out_ptr):
    """lse_out = log2 sum_s 2^lse_s = m + log2(den) of a row's partials (m, den: _split_weights'),
    -inf when all are empty: the merged row's own log2-sum-exp, for merging it with attention
    computed elsewhere."""
    merged = tl.where(den > 0.0, m + tl.log2(tl.where(den > 0.0, den, 1.0)), float("-inf"))
    tl.store(lse_out_ptr, merged)


@triton.jit
def _merge_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,  # part f32 [B,H,S,D], lse f32 [B,H,S] (log2 domain), out [B,H,D]
    lse_out_ptr,  # f32 [B,H] (log2), written when WRITE_LSE
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    S_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row0 = (b * tl.num_programs(1) + h) * NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    offs_s, live, w, den, m = _split_weights(lse_ptr, row0, NUM_SPLITS, S_PAD)
    part = tl.load(
        part_ptr + (row0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=live[:, None] & d_ok[None, :],
        other=0.0,
    )  # [S_PAD, BD]
    o = tl.sum(w[:, None] * part, axis=0) / tl.where(den > 0.0, den, 1.0)  # [BD]
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok
    )
    if WRITE_LSE:
        _store_merged_lse(m, den, lse_out_ptr + b * tl.num_programs(1) + h)


def is_interpreted(kernel) -> bool:
    """True when a @triton.jit function was built for the CPU interpreter (TRITON_INTERPRET=1
    set before import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def require_runnable(name: str, kernel, q: torch.Tensor) -> None:
    """CPU tensors can only go through a kernel built for the interpreter; say so clearly."""
    if q.device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            f"{name}: the Triton kernel cannot run on CPU tensors unless "
            f"TRITON_INTERPRET=1 was set before import; use {name}_ref on CPU."
        )


def split_buffers(q: torch.Tensor, out: torch.Tensor, num_splits: int):
    """(part [B, H, S, D] fp32, lse [B, H, S] fp32) for a split launch; (out, out) — unused by
    the kernels — when there is one split."""
    if num_splits == 1:
        return out, out
    b, h, d = q.shape
    return (
        torch.empty((b, h, num_splits, d), dtype=torch.float32, device=q.device),
        torch.empty((b, h, num_splits), dtype=torch.float32, device=q.device),
    )


def merge_splits(
    part: torch.Tensor,
    lse: torch.Tensor,
    out: torch.Tensor,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine flash-decoding partials part [B, H, S, D] (fp32) with their log2-sum-exp
    lse [B, H, S] into out [B, H, D] (shared by every decode-attention kernel); with lse_out
    (contiguous fp32 [B, H]) also each row's merged log2-sum-exp (-inf for an empty row)."""
    b, h, num_splits, d = part.shape
    check_lse_out(lse_out, b, h, part.device)
    _merge_splits_kernel[(b, h)](
        part,
        lse,
        out,
        lse if lse_out is None else lse_out,
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits,
        S_PAD=max(2, triton.next_power_of_2(num_splits)),
        HEAD_DIM=d,
        BLOCK_D=block_d(d),
        WRITE_LSE=lse_out is not None,
        num_warps=1 if d <= 64 else 2,
    )
    return out


def check_lse_out(lse_out: torch.Tensor | None, b: int, h: int, device) -> None:
    """A merge's optional lse_out must be a contiguous fp32 [B, H] on the partials' device."""
    if lse_out is None:
        return
    if (
        lse_out.shape != (b, h)
        or lse_out.dtype != torch.float32
        or not lse_out.is_contiguous()
        or lse_out.device != device
    ):
        raise ValueError(
            f"lse_out: must be contiguous float32 [{b}, {h}] on {device}, got "
            f"{lse_out.dtype} {tuple(lse_out.shape)} on {lse_out.device}"
        )


def _check_inputs(q, k_cache, v_cache, page_table, seq_lens, scale, num_splits, out):
    """Validate arguments; returns (B, H, KVH, page_size, D). Raises ValueError naming the argument."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_pages, num_kv_heads, page_size, head_dim], "
            f"got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}"
        )
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q dtype must be one of {FLOAT_DTYPES}, got {q.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    B, H, D = q.shape
    _, KVH, page_size, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache head_dim {Dk} != q head_dim {D}")
    if not head_dim_ok(D):
        raise ValueError(head_dim_error(D, "q head_dim"))
    if not is_pow2(page_size):
        raise ValueError(f"k_cache page_size must be a power of two, got {page_size}")
    if KVH == 0 or H % KVH != 0:
        raise ValueError(f"q num_heads {H} must be a multiple of k_cache num_kv_heads {KVH}")
    if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.shape[0] != B:
        raise ValueError(
            f"page_table must be int32 [B={B}, max_pages], "
            f"got {page_table.dtype} {tuple(page_table.shape)}"
        )
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (B,):
        raise ValueError(
            f"seq_lens must be int32 [B={B}], got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("page_table", page_table),
        ("seq_lens", seq_lens),
    ):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    for name, t in (
        ("q", q),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("page_table", page_table),
    ):
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if not seq_lens.is_contiguous():
        raise ValueError("seq_lens must be contiguous")
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a python float, got {type(scale).__name__}")
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), "
                f"got ({tuple(out.shape)}, {out.dtype}, {out.device})"
            )
        if out.numel() > 0 and out.stride(-1) != 1:
            raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    return B, H, KVH, page_size, D


def _launch_config(head_dim: int, page_size: int, dtype: torch.dtype):
    """Fixed heuristic (no autotune): returns (BLOCK_N, CHUNK, num_warps, num_stages)."""
    # K+V bytes per stage = 2 * BLOCK_N * D * elem; keep ~32 KB/stage for 16-bit types.
    bd = block_d(head_dim)
    block_n = {16: 128, 32: 128, 64: 128, 128: 64, 256: 32}[bd]
    if dtype == torch.float32:
        block_n = max(16, block_n // 2)
    chunk = max(block_n, page_size)  # split granularity: whole blocks and whole pages
    num_warps = 8 if bd >= 256 else 4
    num_stages = 2 if (bd >= 256 or dtype == torch.float32) else 3
    return block_n, chunk, num_warps, num_stages


def paged_decode_splits(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits of the paged bf16 kernel for a batch, fixed for every length (decode graphs are
    captured per batch size): about two programs per SM."""
    programs = max(1, batch * num_kv_heads)
    return int(min(32, max(1, -(-2 * num_sms // programs))))


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int = 132,
    min_tokens_per_split: int = 512,
) -> int:
    """Host heuristic: enough programs for ~2 waves, but no split shorter than min_tokens_per_split."""
    programs = max(1, batch * num_kv_heads)
    want = triton.cdiv(2 * num_sms, programs)
    cap = max(1, max_seq_len // min_tokens_per_split)
    return int(max(1, min(want, cap, 64)))


def paged_decode_attention(
    q, k_cache, v_cache, page_table, seq_lens, scale, num_splits=1, out=None
):
    """Decode attention over a paged KV cache.  Shapes: see module docstring.  Returns out [B, H, D]."""
    B, H, KVH, page_size, D = _check_inputs(
        q, k_cache, v_cache, page_table, seq_lens, scale, num_splits, out
    )
    require_runnable("paged_decode_attention", _paged_decode_kernel, q)
    if out is None:
        out = torch.empty_like(q)
    if B == 0 or H == 0:
        return out
    G = H // KVH
    block_n, chunk, num_warps, num_stages = _launch_config(D, page_size, q.dtype)
    part, lse = split_buffers(q, out, num_splits)
    _paged_decode_kernel[(B, KVH, num_splits)](
        q,
        k_cache,
        v_cache,
        page_table,
        seq_lens,
        out,
        part,
        lse,
        float(scale) * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        page_table.stride(0),
        out.stride(0),
        out.stride(1),
        G=G,
        G_PAD=max(16, triton.next_power_of_2(G)),
        HEAD_DIM=D,
        BLOCK_D=block_d(D),
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        CHUNK=chunk,
        NUM_SPLITS=num_splits,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        merge_splits(part, lse, out)
    return out


def paged_decode_attention_ref(
    q, k_cache, v_cache, page_table, seq_lens, scale, num_splits=1, out=None
):
    """Pure-torch fp32 reference (gathers pages; syncs on seq_lens; ignores num_splits)."""
    B, H, KVH, page_size, D = _check_inputs(
        q, k_cache, v_cache, page_table, seq_lens, scale, num_splits, out
    )
    G = H // KVH
    res = torch.zeros((B, H, D), dtype=torch.float32, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        if n <= 0:
            continue  # padding row -> zeros
        ids = page_table[b, : math.ceil(n / page_size)].long()  # [pages]
        k = k_cache[ids].float().transpose(0, 1).reshape(KVH, -1, D)[:, :n]  # [KVH, n, D]
        v = v_cache[ids].float().transpose(0, 1).reshape(KVH, -1, D)[:, :n]  # [KVH, n, D]
        qb = q[b].float().view(KVH, G, D)  # [KVH, G, D]
        p = (torch.einsum("kgd,knd->kgn", qb, k) * scale).softmax(dim=-1)  # [KVH, G, n]
        res[b] = torch.einsum("kgn,knd->kgd", p, v).reshape(H, D)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out
