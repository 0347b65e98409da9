"""Baseline: decode attention on FP8 (e4m3) KV pages with one scale per (page, kv head).

  * ``fp8_decode_attention``      -- Triton kernel + host wrapper (GQA, flash-decoding splits, CUDA-graph safe).
  * ``fp8_decode_attention_ref``  -- pure-torch fp32 reference with the same signature (NOT graph safe).
  * ``fp8_bytes_per_token``       -- exact stored bytes per token per kv head (K + V, amortized over a page).

Layout of one layer (P = page_size, D = head_dim):
  k, v              float8_e4m3fn [N, KVH, P, D]   x ~= float(x8) * scale
  k_scale, v_scale  float32       [N, KVH]         one scale per page and kv head
Pool tensors must be contiguous.  The call inputs (q, page_table, n_pages, dense tail, dense_lens) are the
same as kivi_decode_attention.py's: all n_pages[b] * P quantized tokens are attended plus dense_lens[b]
16-bit tail tokens; n_pages[b] == dense_lens[b] == 0 is a padding row (zeros).

Kernel: grid (B, KVH, num_splits); one program owns the G query heads of a kv head as a [G_PAD >= 16, D]
tile and streams its split's pages NP at a time (BLOCK_N = NP * P tokens).  fp8 tiles are loaded and
converted to q's dtype (exact for e4m3 -> fp16 / bf16 / fp32), the per-page K scale is folded into the
scores, s = (q . k8) * k_scale * softmax_scale, and the V scale into the probabilities,
o += (p * v_scale) . v8, so no dequantized tile is ever formed.  Online softmax in the log2 domain, fp32
accumulation; the last split also attends the dense tail; splits are merged by paged_decode_attention's
merge kernel.  No host syncs, grid depends on shapes only: CUDA-graph capturable.  Any even head_dim in
[8, 256]: tiles are BLOCK_D (the next power of two >= max(16, D)) wide, channels >= D masked on every load
and store (kernels/head_dim.py).
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import is_pow2
from zipserve.kernels.decode_steps import _dense_tail, _split_pages
from zipserve.kernels.head_dim import block_d
from zipserve.kernels.kivi_decode_attention import _attend_rows_ref, _check_call_args
from zipserve.kernels.kivi_decode_kernel import _store_result
from zipserve.kernels.paged_decode_attention import (
    merge_splits,
    require_runnable,
    split_buffers,
)

__all__ = ["fp8_decode_attention", "fp8_decode_attention_ref", "fp8_bytes_per_token"]

_LOG2E = 1.4426950408889634
_FP8 = torch.float8_e4m3fn


@triton.jit
def _fp8_decode_kernel(
    q_ptr,
    k_ptr,
    ks_ptr,
    v_ptr,
    vs_ptr,  # q [B,H,D]; k/v fp8 [N,KVH,P,D], scales f32 [N,KVH] (contiguous)
    pt_ptr,
    np_ptr,
    dk_ptr,
    dv_ptr,
    dl_ptr,  # page_table [B,MP], n_pages [B], dense k/v [B,KVH,T,D], lens [B]
    out_ptr,
    part_ptr,
    lse_ptr,  # out [B,H,D]; part f32 [B,H,S,D]; lse f32 [B,H,S] (log2 domain)
    qk_scale,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_ptb,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_ob,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    NP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DENSE_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    KVH = tl.num_programs(1)
    BLOCK_N: tl.constexpr = NP * PAGE

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * G + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=(offs_g < G)[:, None] & d_ok[None, :],
        other=0.0,
    )  # [G_PAD, BD]; padding zeros
    cdt = q.dtype

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)

    # ---- dense 16-bit tail: last split only.
    dl = tl.where(split == NUM_SPLITS - 1, tl.load(dl_ptr + b), 0)
    m_i, l_i, acc = _dense_tail(
        q,
        dk_ptr + b * stride_dkb + kvh * stride_dkh,
        dv_ptr + b * stride_dvb + kvh * stride_dvh,
        stride_dkt,
        stride_dvt,
        dl,
        offs_d,
        d_ok,
        offs_d,
        d_ok,
        m_i,
        l_i,
        acc,
        qk_scale,
        DENSE_BLOCK,
        DOT_PREC,
    )

    # ---- fp8 pages: this split's page range [lo, hi), whole steps of NP pages.
    lo, hi = _split_pages(tl.load(np_ptr + b), split, NUM_SPLITS, NP)
    pt_row = pt_ptr + b * stride_ptb
    slot = offs_n % PAGE
    for blk in range(lo, hi, NP):
        pg = blk + offs_n // PAGE  # [N] logical page of each token
        ok = pg < hi
        prow = (
            tl.load(pt_row + pg, mask=ok, other=0).to(tl.int64) * KVH + kvh
        )  # [N] (page, head) pool row
        tok = (prow * PAGE + slot)[:, None] * HEAD_DIM + offs_d[None, :]  # [N, BD] element offsets
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + tok, mask=kv_ok, other=0.0).to(cdt)  # exact conversion
        v = tl.load(v_ptr + tok, mask=kv_ok, other=0.0).to(cdt)
        ks = tl.load(ks_ptr + prow, mask=ok, other=0.0)  # [N] page scale of each token
        vs = tl.load(vs_ptr + prow, mask=ok, other=0.0)

        s = (
            tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * (ks * qk_scale)[None, :]
        )  # [G_PAD, N]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the step has >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = (p * vs[None, :]).to(cdt)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PREC)
        m_i = m_new

    _store_result(
        out_ptr,
        part_ptr,
        lse_ptr,
        m_i,
        l_i,
        acc,
        b,
        kvh,
        split,
        KVH,
        stride_ob,
        stride_oh,
        G,
        G_PAD,
        HEAD_DIM,
        BLOCK_D,
        NUM_SPLITS,
    )


def _check_inputs(
    q,
    k,
    k_scale,
    v,
    v_scale,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    num_splits,
    out,
):
    """Validate arguments; returns (B, H, KVH, P, D).  Raises ValueError naming the argument."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype != _FP8 or t.dim() != 4:
            raise ValueError(
                f"{name} must be {_FP8} [num_pages, KVH, page_size, head_dim], got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a tensor, got {type(q).__name__}")
    N, KVH, P, Dk = k.shape
    B, H, D = _check_call_args(
        q,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        num_splits,
        out,
        KVH,
        "k",
        k.device,
    )
    if Dk != D:
        raise ValueError(f"k head_dim {Dk} != q head_dim {D}")
    if not (is_pow2(P) and P >= 16):
        raise ValueError(f"k page_size must be a power of two >= 16, got {P}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if (
            not isinstance(t, torch.Tensor)
            or t.dtype != torch.float32
            or tuple(t.shape) != (N, KVH)
        ):
            raise ValueError(
                f"{name} must be float32 [N={N}, KVH={KVH}], got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
    for name, t in (("k", k), ("k_scale", k_scale), ("v", v), ("v_scale", v_scale)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return B, H, KVH, P, D


def fp8_bytes_per_token(head_dim: int, page_size: int = 64) -> float:
    """Exact stored bytes per token per kv head, K and V together, amortized over a page.

    fp8 values 2 * D, plus one float32 scale per page for K and one for V: 2 * 4 / P.
    D=128, P=64: 256.125 B (bf16 KV: 512 B).
    """
    if head_dim <= 0 or page_size <= 0:
        raise ValueError(f"head_dim and page_size must be positive, got {head_dim}, {page_size}")
    return 2 * head_dim + 2 * 4 / page_size


def _launch_config(head_dim: int, page_size: int, dtype: torch.dtype):
    """Fixed heuristic (no autotune): (NP pages per step, num_warps, num_stages).

    fp8 tiles are half the bytes of bf16 ones, so a step takes 128 tokens up to D=128 and one 64-token
    page at D=256 (D: the padded tile width).  fp32 queries (tests / debugging) stage fp32 dot operands:
    2 stages keep shared memory under Hopper's 227 KB at D=256.
    """
    bd = block_d(head_dim)
    np_ = max(1, (128 if bd <= 128 else 64) // page_size)
    num_warps = 8 if np_ * page_size * bd >= 16384 else 4
    return np_, num_warps, 2 if dtype == torch.float32 else 3


def fp8_decode_attention(
    q,
    k,
    k_scale,
    v,
    v_scale,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    num_splits=1,
    out=None,
):
    """Decode attention on FP8 pages + a dense tail (module docstring).  Returns out [B, H, D]."""
    B, H, KVH, P, D = _check_inputs(
        q,
        k,
        k_scale,
        v,
        v_scale,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        num_splits,
        out,
    )
    require_runnable("fp8_decode_attention", _fp8_decode_kernel, q)
    if out is None:
        out = torch.empty_like(q)
    if B == 0 or H == 0:
        return out
    G = H // KVH
    np_, num_warps, num_stages = _launch_config(D, P, q.dtype)
    part, lse = split_buffers(q, out, num_splits)
    _fp8_decode_kernel[(B, KVH, num_splits)](
        q,
        k,
        k_scale,
        v,
        v_scale,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        out,
        part,
        lse,
        float(scale) * _LOG2E,
        q.stride(0),
        q.stride(1),
        page_table.stride(0),
        dense_k.stride(0),
        dense_k.stride(1),
        dense_k.stride(2),
        dense_v.stride(0),
        dense_v.stride(1),
        dense_v.stride(2),
        out.stride(0),
        out.stride(1),
        G=G,
        G_PAD=max(16, triton.next_power_of_2(G)),
        HEAD_DIM=D,
        BLOCK_D=block_d(D),
        PAGE=P,
        NP=np_,
        NUM_SPLITS=num_splits,
        DENSE_BLOCK=64,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        merge_splits(part, lse, out)
    return out


def fp8_decode_attention_ref(
    q,
    k,
    k_scale,
    v,
    v_scale,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    num_splits=1,
    out=None,
):
    """Pure-torch fp32 reference: gathers the row's pages, dequantizes them (fp8 -> fp32 times the page
    scale), appends the dense tail and runs softmax attention.  Loops over rows with host syncs on the
    lengths: not CUDA-graph capturable.  Ignores num_splits."""
    B, H, KVH, P, D = _check_inputs(
        q,
        k,
        k_scale,
        v,
        v_scale,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        num_splits,
        out,
    )
    rows = []
    for b, (npg, dl) in enumerate(zip(n_pages.tolist(), dense_lens.tolist())):
        npg, dl = max(npg, 0), max(dl, 0)
        if npg == 0 and dl == 0:
            rows.append(None)
            continue
        ids = page_table[b, :npg].long()
        kd = k[ids].float() * k_scale[ids][:, :, None, None]  # [n, KVH, P, D]
        vd = v[ids].float() * v_scale[ids][:, :, None, None]
        kd = torch.cat(
            [kd.transpose(0, 1).reshape(KVH, npg * P, D), dense_k[b, :, :dl].float()], dim=1
        )
        vd = torch.cat(
            [vd.transpose(0, 1).reshape(KVH, npg * P, D), dense_v[b, :, :dl].float()], dim=1
        )
        rows.append((kd, vd))
    return _attend_rows_ref(q, rows, scale, out)
