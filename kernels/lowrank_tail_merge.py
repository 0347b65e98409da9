"""The dense tail of the `lowrank+hack` codec's decode attention, merged with its pages, in one launch.

  * ``lowrank_tail_merge``      -- Triton kernel + host wrapper (GQA).
  * ``lowrank_tail_merge_ref``  -- pure-torch fp32 reference with the same signature.

compress/lowrank.py (``LowRankLayerCodec._hack_decode``) attends a query to a layer in two parts:
the sealed pages (HACK codes in a reduced basis) through the HACK decode kernel, which returns
their normalized output o_p and log2-sum-exp lse_p, and the 16-bit dense tail (sinks + the open
page, at full head dim) by plain attention; the two are merged by their log-sum-exps. This module
is the second half: tail attention and merge, fused (one launch per layer instead of ~35 tiny ones).

Layout of one layer (W: the pages' width, only its first rv columns are meaningful):
  q           [B, H, D]        fp16 / bf16 / fp32, after RoPE; H = KVH * G (head h reads kv head h // G)
  dense_k     [B, KVH, T, D]   any float dtype, last dim contiguous, other strides free
  dense_v     [B, KVH, T, D]   likewise; V in its completed basis
  dense_lens  int32 [B]        row b attends its first dense_lens[b] tail tokens (0: none)
  dense_rows, dense_start      optional int32 [B]: sequence b's tail is row dense_rows[b] of
              dense_k / dense_v from column dense_start[b] (defaults b, 0), read in place (the
              compressed cache's tail buffer [slots, KVH, s + P + 1, D], as HACK's kernel takes it);
              dense_lens[b] <= T - dense_start[b]
  o_p         fp32 [B, H, S, W] the pages' S flash-decoding partials, each normalized (W: HACK's
                               width, which may pass D for a small head_dim); [B, H, W] is one
                               partial (S = 1)
  lse_p       fp32 [B, H, S]   each partial's log2-sum-exp of scores * scale * log2(e), -inf: an
                               empty partial (its o_p is not read); [B, H] with a [B, H, W] o_p
  rotation    optional fp32 [W, W]: o_p is in the pages' rotated basis (HACK's Hadamard R, the
                               query projected into it by the caller); the kernel takes o_p @ R
                               back (one small fp32 dot), so HACK needs no rotating merge
  out         [B, H, D]        q's dtype: columns < rv mix both parts, the others are the tail's

Merge: the pages' partials first (HACK's split merge, done here so it costs no launch of its
own), o_p = sum_s 2^(lse_s - m_s) o_s / sum_s 2^(lse_s - m_s) with m_s = max_s lse_s and lse_p =
m_s + log2 of that sum; then with the tail (lse_t, o_t; an empty side has lse -inf and weight 0):
  m = max(lse_p, lse_t) (0 if both are -inf), w_p = 2^(lse_p - m), w_t = 2^(lse_t - m),
  out = (o_t * w_t + [o_p[:, :, :rv], 0] * w_p) / (w_p + w_t)   (zeros where both sides are empty).

Kernel: grid (B, KVH); one program owns the G query heads of a kv head as a [G_PAD >= 16, BLOCK_D]
tile (tl.dot's smallest M / K), streams the row's tail BLOCK_T tokens at a time through the
shared online softmax (kernels/decode_steps.py, log2 domain, fp32 accumulators), then merges
those heads' S partials (a head at a time, an [S, W] tile each) and the tail, and stores. Dots run in q's 16-bit dtype when q and the tail share it,
else in fp32 (and for bfloat16 under the CPU interpreter). No host syncs: CUDA graphs capture it.
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES, describe
from zipserve.kernels.decode_steps import _dense_tail
from zipserve.kernels.hack_decode_attention import tail_index
from zipserve.kernels.head_dim import block_d, head_dim_error, head_dim_ok
from zipserve.kernels.paged_decode_attention import (
    _split_weights,
    is_interpreted,
    require_runnable,
)
from zipserve.kernels.rotated_merge import split_weights_ref

__all__ = ["lowrank_tail_merge", "lowrank_tail_merge_ref"]

_LOG2E = 1.4426950408889634
BLOCK_T = 64  # tail tokens per step (a tail holds at most page_size + sinks tokens)


@triton.jit
def _lowrank_tail_merge_kernel(
    q_ptr,  # [B, H, D]
    dk_ptr,
    dv_ptr,  # [B, KVH, T, D] each
    dl_ptr,  # int32 [B]
    rows_ptr,  # int32 [B]: the tail row of sequence b
    start_ptr,  # int32 [B]: its first column
    op_ptr,  # fp32 [B, H, S, W]: the pages' partials
    lp_ptr,  # fp32 [B, H, S], log2, contiguous
    rot_ptr,  # fp32 [W, W] when ROTATE: o_p is in the pages' rotated basis, o_p @ R is not
    out_ptr,  # [B, H, D], q's dtype
    qk_scale,  # softmax scale * log2(e)
    rv,  # o_p's meaningful columns
    W,  # o_p's width
    stride_qb,
    stride_qh,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_opb,
    stride_oph,
    stride_ops,
    stride_ob,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    W_PAD: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    S_PAD: tl.constexpr,
    ROTATE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    g_ok = offs_g < G
    d_ok = offs_d < HEAD_DIM
    heads = kvh * G + offs_g  # [G_PAD]
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [G_PAD, BD]; padded rows / channels are zeros
    if UPCAST:
        q = q.to(tl.float32)  # the tail follows q's dtype in _dense_tail

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    row = tl.load(rows_ptr + b).to(tl.int64)
    start = tl.load(start_ptr + b).to(tl.int64)
    m_i, l_i, acc = _dense_tail(
        q,
        dk_ptr + row * stride_dkb + kvh * stride_dkh + start * stride_dkt,
        dv_ptr + row * stride_dvb + kvh * stride_dvh + start * stride_dvt,
        stride_dkt,
        stride_dvt,
        tl.load(dl_ptr + b),
        offs_d,
        d_ok,
        offs_d,
        d_ok,
        m_i,
        l_i,
        acc,
        qk_scale,
        BLOCK_T,
        DOT_PREC,
    )
    c_ok = offs_d < rv
    op_head0 = op_ptr + b * stride_opb + (kvh * G) * stride_oph  # the first head's partial 0
    lse_row0 = (b * tl.num_programs(1) * G + kvh * G) * NUM_PARTS  # lse_p contiguous [B, H, S]
    if ROTATE:  # the partials' W columns, each merged row taken back by R[:, :rv] in fp32
        cols = tl.arange(0, W_PAD)
        col_ok = cols < W
        rot = tl.load(
            rot_ptr + cols[:, None] * W + offs_d[None, :],
            mask=col_ok[:, None] & c_ok[None, :],
            other=0.0,
        )  # [W_PAD, BD]
    else:  # the partials' first rv columns as they are
        cols, col_ok, rot = offs_d, c_ok, 0.0
    o_p, lse_p = _merge_parts(
        op_head0,
        lse_row0,
        stride_oph,
        stride_ops,
        cols,
        col_ok,
        rot,
        lp_ptr,
        G,
        G_PAD,
        BLOCK_D,
        NUM_PARTS,
        S_PAD,
        ROTATE,
    )  # [G_PAD, BD], zeros from column rv on; [G_PAD]
    o = _merge_pages(m_i, l_i, acc, o_p, lse_p)  # [G_PAD, BD]
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _merge_parts(
    op_head0,  # pointer: partial 0, column 0 of the program's first head
    lse_row0,  # int: the flat index of that head's partial 0 in the contiguous lse [B, H, S]
    stride_oph,
    stride_ops,
    cols,  # [C] the partials' columns read
    col_ok,  # [C]
    rot,  # [C, C_OUT] fp32 when ROTATE: each merged row leaves as row @ rot
    lse_ptr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    C_OUT: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    S_PAD: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """The program's G heads' NUM_PARTS partials merged by their log2-sum-exps: (o [G_PAD, C_OUT]
    normalized, rotated with ROTATE, zeros where a head has no scores; lse [G_PAD], -inf there).
    A head at a time, as a [S_PAD, C] tile (the split merges' _split_weights: empty partials are
    not read) and, rotated, a row times the [C, C_OUT] tile in fp32 FMAs: few registers whatever
    G_PAD the tail's dots need (a [G_PAD, W] fp32 tl.dot spilled on sm_90)."""
    offs_g = tl.arange(0, G_PAD)
    o = tl.zeros([G_PAD, C_OUT], tl.float32)
    lse = tl.full([G_PAD], float("-inf"), tl.float32)
    for g in tl.static_range(G):
        offs_s, live, w, den, m = _split_weights(
            lse_ptr, lse_row0 + g * NUM_PARTS, NUM_PARTS, S_PAD
        )
        part = tl.load(
            op_head0 + g * stride_oph + offs_s[:, None] * stride_ops + cols[None, :],
            mask=live[:, None] & col_ok[None, :],
            other=0.0,
        )  # [S_PAD, C]
        has = den > 0.0
        row = tl.sum(w[:, None] * part, axis=0) / tl.where(has, den, 1.0)  # [C]
        if ROTATE:
            row = tl.sum(row[:, None] * rot, axis=0)  # [C_OUT]
        sel = offs_g == g
        o = tl.where(sel[:, None], row[None, :], o)
        lse = tl.where(sel, tl.where(has, m + tl.log2(tl.where(has, den, 1.0)), float("-inf")), lse)
    return o, lse


@triton.jit
def _merge_pages(m_i, l_i, acc, o_p, lse_p):
    """The tail's running softmax (m_i, l_i [GP], acc [GP, BD] fp32, log2 domain) merged with the
    pages' normalized output o_p [GP, BD] (zeros past their columns) and log2-sum-exp lse_p [GP]
    (-inf: no pages). Returns the normalized output [GP, BD] fp32."""
    has_t = l_i > 0.0
    l_safe = tl.where(has_t, l_i, 1.0)
    lse_t = tl.where(has_t, m_i + tl.log2(l_safe), float("-inf"))  # [GP]
    m = tl.maximum(lse_p, lse_t)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_p = tl.exp2(lse_p - m)  # 0 for an empty side
    w_t = tl.exp2(lse_t - m)
    tot = w_p + w_t
    o = (acc / l_safe[:, None]) * w_t[:, None] + o_p * w_p[:, None]
    return o / tl.where(tot > 0.0, tot, 1.0)[:, None]


def _is_tensor(x, dim: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == dim


def _check_args(
    q,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    o_p,
    lse_p,
    rv,
    dense_rows=None,
    dense_start=None,
    rotation=None,
):
    """Validate arguments; returns (B, H, KVH, T, D, W). Raises ValueError naming the argument.
    dense_lens' values are checked on CPU only (no device sync)."""
    if not _is_tensor(q, 3) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be [B, H, D] of {FLOAT_DTYPES}, got {describe(q)}")
    B, H, D = q.shape
    if not head_dim_ok(D):
        raise ValueError(head_dim_error(D, "q head_dim"))
    for name, t in (("dense_k", dense_k), ("dense_v", dense_v)):
        if not _is_tensor(t, 4) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be [B, KVH, T, D] of {FLOAT_DTYPES}, got {describe(t)}")
        if (dense_rows is None and t.shape[0] != B) or t.shape[3] != D:
            raise ValueError(f"{name} must be [B={B}, KVH, T, D={D}], got {tuple(t.shape)}")
    KVH, T = dense_k.shape[1], dense_k.shape[2]
    if dense_v.shape != dense_k.shape:
        raise ValueError(f"dense_v shape {tuple(dense_v.shape)} != dense_k {tuple(dense_k.shape)}")
    if KVH == 0 or H % KVH:
        raise ValueError(f"q num_heads {H} must be a multiple of dense_k num_kv_heads {KVH}")
    if not _is_tensor(dense_lens, 1) or dense_lens.dtype != torch.int32:
        raise ValueError(f"dense_lens must be int32 [B={B}], got {describe(dense_lens)}")
    if dense_lens.shape[0] != B or not dense_lens.is_contiguous():
        raise ValueError(f"dense_lens must be contiguous int32 [B={B}], got {describe(dense_lens)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a python float, got {type(scale).__name__}")
    if not (_is_tensor(o_p, 3) or _is_tensor(o_p, 4)) or o_p.dtype != torch.float32:
        raise ValueError(f"o_p must be float32 [B, H, S, W] or [B, H, W], got {describe(o_p)}")
    W = o_p.shape[-1]
    if o_p.shape[:2] != (B, H) or W < 1 or (o_p.dim() == 4 and o_p.shape[2] < 1):
        raise ValueError(
            f"o_p must be float32 [B={B}, H={H}, S >= 1, W >= 1] or [B={B}, H={H}, W >= 1], "
            f"got {describe(o_p)}"
        )
    want = o_p.shape[:-1]  # [B, H, S] or [B, H]
    if not isinstance(lse_p, torch.Tensor) or lse_p.dtype != torch.float32 or lse_p.shape != want:
        raise ValueError(f"lse_p must be float32 {list(want)} as o_p, got {describe(lse_p)}")
    if not isinstance(rv, int) or isinstance(rv, bool) or not 1 <= rv <= min(W, D):
        raise ValueError(f"rv must be an int in [1, min(W={W}, D={D})], got {rv!r}")
    for name, t in (("dense_rows", dense_rows), ("dense_start", dense_start)):
        if t is not None and (not _is_tensor(t, 1) or t.dtype != torch.int32 or t.shape[0] != B):
            raise ValueError(f"{name} must be int32 [B={B}], got {describe(t)}")
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    if rotation is not None and (
        not _is_tensor(rotation, 2)
        or rotation.dtype != torch.float32
        or rotation.shape != (W, W)
        or not rotation.is_contiguous()
        or rotation.device != q.device
    ):
        raise ValueError(
            f"rotation must be contiguous float32 [W={W}, W={W}] on {q.device}, "
            f"got {describe(rotation)}"
        )
    named = (("dense_k", dense_k), ("dense_v", dense_v), ("dense_lens", dense_lens))
    for name, t in named + (("o_p", o_p), ("lse_p", lse_p)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    for name, t in (("q", q), ("dense_k", dense_k), ("dense_v", dense_v), ("o_p", o_p)):
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if q.device.type == "cpu" and B:
        start = 0 if dense_start is None else dense_start
        if (dense_lens < 0).any() or (dense_lens > T - start).any():
            raise ValueError(
                f"dense_lens must be in [0, T={T} - dense_start], got {dense_lens.tolist()}"
            )
        if dense_rows is not None and (
            (dense_rows < 0).any() or (dense_rows >= len(dense_k)).any()
        ):
            raise ValueError(f"dense_rows must index dense_k's {len(dense_k)} rows")
    return B, H, KVH, T, D, W


def _dots_in_16_bits(q, dense_k, dense_v) -> bool:
    """The kernel's dots run in q's 16-bit dtype when the tail shares it, else in fp32 (also for
    bfloat16 under the CPU interpreter, whose tl.dot mis-computes bfloat16)."""
    if q.dtype == torch.float32 or not dense_k.dtype == dense_v.dtype == q.dtype:
        return False
    return q.dtype == torch.float16 or not is_interpreted(_lowrank_tail_merge_kernel)


def lowrank_tail_merge(
    q,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    o_p,
    lse_p,
    rv,
    dense_rows=None,
    dense_start=None,
    rotation=None,
):
    """Tail attention + merge with the pages (module docstring). Returns out [B, H, D] in q's dtype."""
    B, H, KVH, T, D, W = _check_args(
        q, dense_k, dense_v, dense_lens, scale, o_p, lse_p, rv, dense_rows, dense_start, rotation
    )
    require_runnable("lowrank_tail_merge", _lowrank_tail_merge_kernel, q)
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0 or H == 0:
        return out
    G = H // KVH
    lowp = _dots_in_16_bits(q, dense_k, dense_v)
    rows, start = tail_index(q, dense_rows, dense_start)
    if o_p.dim() == 3:  # one partial
        o_p, lse_p = o_p.unsqueeze(2), lse_p.unsqueeze(2)
    lse_p = lse_p.contiguous()  # [B, H, S] (the split kernels' is already)
    S = o_p.shape[2]
    _lowrank_tail_merge_kernel[(B, KVH)](
        q,
        dense_k,
        dense_v,
        dense_lens,
        rows,
        start,
        o_p,
        lse_p,
        o_p if rotation is None else rotation,
        out,
        float(scale) * _LOG2E,
        rv,
        W,
        q.stride(0),
        q.stride(1),
        dense_k.stride(0),
        dense_k.stride(1),
        dense_k.stride(2),
        dense_v.stride(0),
        dense_v.stride(1),
        dense_v.stride(2),
        o_p.stride(0),
        o_p.stride(1),
        o_p.stride(2),
        out.stride(0),
        out.stride(1),
        G=G,
        G_PAD=max(16, triton.next_power_of_2(G)),
        HEAD_DIM=D,
        BLOCK_D=block_d(D),
        BLOCK_T=BLOCK_T,
        W_PAD=max(16, triton.next_power_of_2(W)),
        NUM_PARTS=S,
        S_PAD=max(2, triton.next_power_of_2(S)),
        ROTATE=rotation is not None,
        UPCAST=not lowp,
        DOT_PREC="tf32" if lowp else "ieee",
        # with the rotation (each head's merged row times R's [W, D] tile in fp32 FMAs) 8 warps
        # hold it in 117 registers, 4 in 159 (offline sm_90, Triton 3.9, 17 partials; no stack)
        num_warps=4 if rotation is None else 8,
        num_stages=2,
    )
    return out


def _tail_attention_ref(q, dense_k, dense_v, dense_lens, scale):
    """Plain attention of q [B, H, D] over dense_k/v [B, KVH, T, D]'s first dense_lens[b] tokens
    -> (o [B, H, D] fp32, lse [B, H] fp32 in log2 units, -inf where a row has none)."""
    b, h, d = q.shape
    kvh, t = dense_k.shape[1], dense_k.shape[2]
    qf = q.float().reshape(b, kvh, h // kvh, d)
    s = torch.einsum("bkgd,bktd->bkgt", qf, dense_k.float()) * (scale * _LOG2E)
    keep = torch.arange(t, device=q.device)[None, :] < dense_lens[:, None].long()  # [B, T]
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    m = s.amax(-1) if t else s.new_full(s.shape[:-1], float("-inf"))  # [B, KVH, G]
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp2(s - m[..., None])
    l = p.sum(-1)  # noqa: E741  [B, KVH, G]
    l_safe = torch.where(l > 0, l, 1.0)
    o = torch.einsum("bkgt,bktd->bkgd", p, dense_v.float()) / l_safe[..., None]
    lse = torch.where(l > 0, m + torch.log2(l_safe), float("-inf"))
    return o.reshape(b, h, d), lse.reshape(b, h)


def merge_parts_ref(o_p: torch.Tensor, lse_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding partials o_p [B, H, S, W] / lse_p [B, H, S] (log2; -inf: empty, its o_p not
    read) -> their merge (o [B, H, W] normalized, zeros for a row without scores; lse [B, H], -inf
    there), in fp32."""
    live, w, den, m = split_weights_ref(lse_p)  # [B, H, S] x 2, [B, H, 1] x 2
    parts = torch.where(live[..., None], o_p, 0.0)  # an empty partial's o_p may be anything
    o = (w[..., None] * parts).sum(-2) / torch.where(den > 0, den, 1.0)
    den, m = den[..., 0], m[..., 0]  # [B, H]
    lse = torch.where(den > 0, m + torch.log2(torch.where(den > 0, den, 1.0)), float("-inf"))
    return o, lse


def lowrank_tail_merge_ref(
    q,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    o_p,
    lse_p,
    rv,
    dense_rows=None,
    dense_start=None,
    rotation=None,
):
    """fp32 torch reference: the tail's attention (o_t, lse_t), then the log-sum-exp merge with the
    pages' first rv columns (of o_p @ rotation when one is given). Returns out [B, H, D] in q's
    dtype."""
    _check_args(
        q, dense_k, dense_v, dense_lens, scale, o_p, lse_p, rv, dense_rows, dense_start, rotation
    )
    if o_p.dim() == 4:
        o_p, lse_p = merge_parts_ref(o_p, lse_p)
    if rotation is not None:
        o_p = o_p.float() @ rotation
    if dense_rows is not None or dense_start is not None:  # each row's range gathered
        rows, start = tail_index(q, dense_rows, dense_start)
        t = dense_k.shape[2]
        cols = (start[:, None].long() + torch.arange(t, device=q.device)).clamp_max(t - 1)
        gather = (rows.long()[:, None], slice(None), cols)  # -> [B, T, KVH, D]
        dense_k = dense_k[gather].transpose(1, 2)
        dense_v = dense_v[gather].transpose(1, 2)
    o_t, lse_t = _tail_attention_ref(q, dense_k, dense_v, dense_lens, scale)  # [B, H, D], [B, H]
    m = torch.maximum(lse_p, lse_t)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w_p, w_t = torch.exp2(lse_p - m), torch.exp2(lse_t - m)  # 0 for an empty side
    o = o_t * w_t[..., None]
    o[..., :rv] += o_p[..., :rv].float() * w_p[..., None]
    tot = w_p + w_t
    return (o / torch.where(tot > 0, tot, 1.0)[..., None]).to(q.dtype)
