"""The KIVI decode attention Triton kernel (baseline): dequantize 2/4-bit pages in registers, then
the bf16 online softmax. Layout and call inputs: kivi_decode_attention.py (the wrapper).

Kernel: grid (B, KVH, num_splits), one program owns the G = H // KVH query heads of a kv head as a
[G_PAD >= 16, D] tile.  A loop step covers NP pages (BLOCK_N = NP * P tokens): the step's page ids are
gathered from the page table, the packed code bytes are loaded as a [BLOCK_N, D] tile (channel c reads
byte c % DE, shifted by (c // DE) * b; every byte is fetched once from memory and E times from L1), K
scale / min rows are gathered per token group, V scale / min are loaded as [BLOCK_N, D // CG] and
broadcast over each channel group, x = code * scale + min is formed in float16 arithmetic (one fma per
element, like KIVI's half2 CUDA kernels; float32 when q is float32) and converted to q's dtype, and the
step then runs the same online softmax as the bf16 kernel (one q.K^T dot, one p.V dot, fp32
accumulation, log2 domain).  Splits own contiguous ranges of whole steps; the last split also attends the
dense tail.  Splits are merged by paged_decode_attention's merge kernel.  Nothing depends on host values
of the lengths, so the wrapper is CUDA-graph capturable.  head_dim: any multiple of CG (and of E) up to 256;
a D that is not a power of two (96, 160, ...) runs in BLOCK_D = next power of two wide tiles with channels
>= D masked on every load and store, and V's scales gathered per channel (kernels/head_dim.py).
"""

import triton
import triton.language as tl

from zipserve.kernels.decode_steps import _dense_tail, _online_softmax_step, _split_pages


@triton.jit
def _store_result(
    out_ptr,
    part_ptr,
    lse_ptr,
    m_i,
    l_i,
    acc,
    b,
    kvh,
    split,
    num_kv_heads,
    stride_ob,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Normalise and store (NUM_SPLITS == 1) or write the split's partial output + log2-sum-exp.
    acc [G_PAD, BLOCK_D]: channels >= HEAD_DIM are padding, never stored."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_g < G)[:, None] & (offs_d < HEAD_DIM)[None, :]
    heads = kvh * G + offs_g
    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # zeros for an empty range
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
    else:
        row = (b * num_kv_heads * G + heads) * NUM_SPLITS + split  # [G_PAD] row in part / lse
        tl.store(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=offs_g < G)


@triton.jit
def _kivi_decode_kernel(
    q_ptr,
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,  # q [B,H,D]; contiguous pool tensors
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
    BITS: tl.constexpr,
    TG: tl.constexpr,
    CG: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DENSE_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DQ_F32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    KVH = tl.num_programs(1)
    E: tl.constexpr = 8 // BITS
    DE: tl.constexpr = HEAD_DIM // E  # packed bytes per token row
    NGK: tl.constexpr = PAGE // TG  # K scale rows per page
    NGV: tl.constexpr = HEAD_DIM // CG  # V scale columns per token
    BLOCK_N: tl.constexpr = NP * PAGE
    MASK: tl.constexpr = (1 << BITS) - 1
    DQ: tl.constexpr = tl.float32 if DQ_F32 else tl.float16  # dequantization arithmetic

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
    cdt = q.dtype  # dot operand dtype
    byte_d = offs_d % DE  # planar layout: channel c lives in byte c % DE ...
    shift_d = (offs_d // DE) * BITS  # ... at bit offset (c // DE) * b

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

    # ---- quantized pages: this split's page range [lo, hi), whole steps of NP pages.
    lo, hi = _split_pages(tl.load(np_ptr + b), split, NUM_SPLITS, NP)
    pt_row = pt_ptr + b * stride_ptb
    slot = offs_n % PAGE
    for blk in range(lo, hi, NP):
        pg = blk + offs_n // PAGE  # [N] logical page of each token
        ok = pg < hi
        prow = (
            tl.load(pt_row + pg, mask=ok, other=0).to(tl.int64) * KVH + kvh
        )  # [N] (page, head) pool row
        tok_row = prow * PAGE + slot  # [N] (page, head, token) row
        ok2 = ok[:, None] & d_ok[None, :]  # [N, BD]

        # K: codes [N, BD] from the packed bytes, scale / min rows of each token's group.
        kc = tl.load(kc_ptr + tok_row[:, None] * DE + byte_d[None, :], mask=ok2, other=0).to(
            tl.int32
        )
        kq = ((kc >> shift_d[None, :]) & MASK).to(DQ)
        krow = (prow * NGK + slot // TG)[:, None] * HEAD_DIM + offs_d[None, :]  # [N, BD]
        ks = tl.load(ks_ptr + krow, mask=ok2, other=0.0).to(DQ)
        km = tl.load(km_ptr + krow, mask=ok2, other=0.0).to(DQ)
        k = (kq * ks + km).to(cdt)  # [N, BD]

        # V: codes [N, BD], per-token scale / min of each channel group broadcast over its CG channels.
        vc = tl.load(vc_ptr + tok_row[:, None] * DE + byte_d[None, :], mask=ok2, other=0).to(
            tl.int32
        )
        vq = ((vc >> shift_d[None, :]) & MASK).to(DQ)
        if BLOCK_D != HEAD_DIM:  # NGV groups need not be a power of two: gather per channel
            vrow = tok_row[:, None] * NGV + (offs_d // CG)[None, :]  # [N, BD]
            vs = tl.load(vs_ptr + vrow, mask=ok2, other=0.0).to(DQ)
            vm = tl.load(vm_ptr + vrow, mask=ok2, other=0.0).to(DQ)
        elif NGV == 1:
            vs = tl.load(vs_ptr + tok_row, mask=ok, other=0.0).to(DQ)[:, None]  # [N, 1]
            vm = tl.load(vm_ptr + tok_row, mask=ok, other=0.0).to(DQ)[:, None]
        else:
            offs_v = tl.arange(0, NGV)
            vrow = tok_row[:, None] * NGV + offs_v[None, :]  # [N, NGV]
            vs = tl.load(vs_ptr + vrow, mask=ok[:, None], other=0.0).to(DQ)
            vm = tl.load(vm_ptr + vrow, mask=ok[:, None], other=0.0).to(DQ)
            vs = tl.reshape(
                tl.broadcast_to(vs[:, :, None], (BLOCK_N, NGV, CG)), (BLOCK_N, HEAD_DIM)
            )
            vm = tl.reshape(
                tl.broadcast_to(vm[:, :, None], (BLOCK_N, NGV, CG)), (BLOCK_N, HEAD_DIM)
            )
        v = (vq * vs + vm).to(cdt)  # [N, BD]

        m_i, l_i, acc = _online_softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, DOT_PREC)

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


# ---------------------------------------------------------------------------------------------- host side
