"""The fp8 / KIVI chunked-prefill attention Triton kernel (baselines: pages dequantized in registers).
Arguments and layouts: baseline_prefill_attention.py (the wrappers).

Kernel: grid (cdiv(n, BT), KVH); a program owns BT tokens x GP query heads of one kv head (M = BT * GP =
64 rows; rows g >= G masked) and runs one online softmax (log2 domain, fp32 accumulation) over the
past pages (one page per step), the dense past and the chunk's keys up to its last token.
These baselines dequantize: fp8 tiles are converted to q's dtype (exact) with the per-page scale
folded into the scores (K) and the probabilities (V); KIVI codes become code * scale + min in fp16
arithmetic (fp32 when q is fp32), as the decode kernel does.  Dequantized tiles exist only in
registers for one step; nothing dequantized is written to memory.  Any even head_dim in [8, 256] (KIVI:
multiples of its channel group): tiles are BLOCK_D = the next power of two >= max(16, D) wide, channels
>= D masked on every load and store (kernels/head_dim.py).
"""

import triton
import triton.language as tl

from zipserve.kernels.decode_steps import _softmax_update


@triton.jit
def _baseline_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # q [n,H,D]; chunk k/v [n,KVH,D]
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,  # pool (fp8: pages, scale, -, pages, scale, -)
    past_ptr,
    dk_ptr,
    dv_ptr,
    out_ptr,  # past_pages [m] int32; dense k/v [KVH,T,D]; out [n,H,D]
    n_tok,
    n_past,
    dense_len,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dkh,
    stride_dkt,
    stride_dvh,
    stride_dvt,
    stride_ot,
    stride_oh,
    KIVI: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    BT: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
    TG: tl.constexpr,
    CG: tl.constexpr,
    DENSE_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DQ_F32: tl.constexpr,
):
    tile, kvh = tl.program_id(0), tl.program_id(1)
    KVH = tl.num_programs(1)
    M: tl.constexpr = BT * GP
    E: tl.constexpr = 8 // BITS  # KIVI: codes per byte, packed bytes per row, code mask
    DE: tl.constexpr = HEAD_DIM // E
    MASK: tl.constexpr = (1 << BITS) - 1
    NGV: tl.constexpr = HEAD_DIM // CG  # KIVI: V scale columns per token
    DQ: tl.constexpr = tl.float32 if DQ_F32 else tl.float16  # KIVI dequantization arithmetic
    offs_m = tl.arange(0, M)
    row_t = tile * BT + offs_m // GP  # [M] token of each row
    row_g = offs_m % GP
    row_ok = (row_t < n_tok) & (row_g < G)
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, PAGE)
    pd_ok = (offs_p >= 0)[:, None] & d_ok[None, :]  # [P, BD] the real channels of a page tile
    q_row = q_ptr + row_t.to(tl.int64) * stride_qt + (kvh * G + row_g) * stride_qh  # [M]
    q = tl.load(
        q_row[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )  # [M, BD]
    cdt = q.dtype
    all_vis = row_ok[:, None] | (offs_p[None, :] < 0)  # [M, P] every page token, valid rows

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_D], tl.float32)

    # ---- past pages, one per step, dequantized in registers.
    for j in range(0, n_past):
        prow = tl.load(past_ptr + j).to(tl.int64) * KVH + kvh  # pool (page, kv head) row
        tok_row = prow * PAGE + offs_p  # [P]
        if KIVI:
            shift = ((offs_d // DE) * BITS)[None, :]
            kc = tl.load(
                kc_ptr + tok_row[:, None] * DE + (offs_d % DE)[None, :], mask=pd_ok, other=0
            ).to(tl.int32)
            krow = (prow * (PAGE // TG) + offs_p // TG)[:, None] * HEAD_DIM + offs_d[
                None, :
            ]  # [P, BD]
            kt = (
                ((kc >> shift) & MASK).to(DQ) * tl.load(ks_ptr + krow, mask=pd_ok, other=0.0).to(DQ)
                + tl.load(km_ptr + krow, mask=pd_ok, other=0.0).to(DQ)
            ).to(cdt)
            vc = tl.load(
                vc_ptr + tok_row[:, None] * DE + (offs_d % DE)[None, :], mask=pd_ok, other=0
            ).to(tl.int32)
            vrow = tok_row[:, None] * NGV + (offs_d // CG)[None, :]  # [P, BD] scale of each element
            vt = (
                ((vc >> shift) & MASK).to(DQ) * tl.load(vs_ptr + vrow, mask=pd_ok, other=0.0).to(DQ)
                + tl.load(vm_ptr + vrow, mask=pd_ok, other=0.0).to(DQ)
            ).to(cdt)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            m_i, l_i, acc = _softmax_update(s, vt, all_vis, m_i, l_i, acc, DOT_PREC)
        else:
            k8 = tl.load(
                kc_ptr + tok_row[:, None] * HEAD_DIM + offs_d[None, :], mask=pd_ok, other=0.0
            ).to(cdt)  # exact
            v8 = tl.load(
                vc_ptr + tok_row[:, None] * HEAD_DIM + offs_d[None, :], mask=pd_ok, other=0.0
            ).to(cdt)
            s = tl.dot(q, tl.trans(k8), input_precision=DOT_PREC) * (
                tl.load(ks_ptr + prow) * qk_scale
            )
            s = tl.where(all_vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            pv = (p * tl.load(vs_ptr + prow)).to(cdt)  # V scale folded into the probabilities
            acc = acc * alpha[:, None] + tl.dot(pv, v8, input_precision=DOT_PREC)

    # ---- 16-bit past every row sees, then the chunk causally (keys up to the tile's last token).
    offs_t = tl.arange(0, DENSE_BLOCK)
    for start in range(0, dense_len, DENSE_BLOCK):
        t = start + offs_t
        t_ok = t < dense_len
        td_ok = t_ok[:, None] & d_ok[None, :]
        dk = tl.load(
            dk_ptr + kvh * stride_dkh + t[:, None] * stride_dkt + offs_d[None, :],
            mask=td_ok,
            other=0.0,
        )
        dv = tl.load(
            dv_ptr + kvh * stride_dvh + t[:, None] * stride_dvt + offs_d[None, :],
            mask=td_ok,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(dk), input_precision=DOT_PREC) * qk_scale
        m_i, l_i, acc = _softmax_update(
            s, dv, row_ok[:, None] & t_ok[None, :], m_i, l_i, acc, DOT_PREC
        )
    hi = tl.minimum(n_tok, (tile + 1) * BT)
    for start in range(0, hi, DENSE_BLOCK):
        t = start + offs_t
        t_ok = t < hi
        t64 = t.to(tl.int64)
        td_ok = t_ok[:, None] & d_ok[None, :]
        ck = tl.load(
            k_ptr + kvh * stride_kh + t64[:, None] * stride_kt + offs_d[None, :],
            mask=td_ok,
            other=0.0,
        )
        cv = tl.load(
            v_ptr + kvh * stride_vh + t64[:, None] * stride_vt + offs_d[None, :],
            mask=td_ok,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(ck), input_precision=DOT_PREC) * qk_scale
        vis = row_ok[:, None] & t_ok[None, :] & (t[None, :] <= row_t[:, None])
        m_i, l_i, acc = _softmax_update(s, cv, vis, m_i, l_i, acc, DOT_PREC)

    o = acc / tl.where(row_ok, l_i, 1.0)[:, None]  # every valid row sees its own token
    dst = out_ptr + row_t.to(tl.int64) * stride_ot + (kvh * G + row_g) * stride_oh  # [M]
    tl.store(
        dst[:, None] + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
