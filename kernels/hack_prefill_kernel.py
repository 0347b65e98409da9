"""The HACK chunked-prefill attention Triton kernel: a chunk of new tokens over cached 2/4-bit pages,
nothing dequantized. Arguments, layout and math: hack_prefill_attention.py (the wrapper).

Kernel: grid (cdiv(n, BT), KVH).  A program owns BT tokens x GP query heads of one kv head (M = BT * GP
rows, GP = next power of two >= G, rows g >= G masked): every row shares the kv head, so one loop step is
one page (q~ differs per page but not per row) with E dots [M, DE] x [DE, P] for QK and E dots
[M, P] x [P, DE] for PV, then the dense past, then the chunk's keys up to the tile's last token.
No split along the past: a prefill chunk has n * KVH / BT programs already.  head_dim: as the decode
kernel (a multiple of 32 up to 256; planes padded to DEP, the dense parts to BLOCK_D, padding masked).
"""

import triton
import triton.language as tl

from zipserve.kernels.hack_decode_kernel import _unpack, _v_group, _v_plane


@triton.jit
def _dense_block(
    acc0,
    acc1,
    acc2,
    acc3,
    m_i,
    l_i,
    q_full,
    k_row,
    v_row,
    t_ok,
    vis,
    qk_scale,
    offs_c,
    c_ok,
    offs_d,
    d_ok,
    E: tl.constexpr,
    DE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One block of 16-bit keys: k_row/v_row [DB] row pointers, vis [M, DB] visibility; offs_d /
    offs_c with d_ok / c_ok: the padded channels of a head / a plane and the real ones."""
    dk = tl.load(
        k_row[:, None] + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0
    )  # [DB, BD]
    sc = tl.dot(q_full, tl.trans(dk), input_precision=DOT_PREC)  # [M, DB]
    sc = tl.where(vis, sc * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(sc - m_use[:, None])  # [M, DB]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    tc_ok = t_ok[:, None] & c_ok[None, :]
    dv = tl.load(v_row[:, None] + offs_c[None, :], mask=tc_ok, other=0.0)  # [DB, DEP]
    acc0 = tl.dot(p.to(dv.dtype), dv, acc0 * alpha[:, None], input_precision=DOT_PREC)
    dv = tl.load(v_row[:, None] + DE + offs_c[None, :], mask=tc_ok, other=0.0)
    acc1 = tl.dot(p.to(dv.dtype), dv, acc1 * alpha[:, None], input_precision=DOT_PREC)
    if E == 4:
        dv = tl.load(v_row[:, None] + 2 * DE + offs_c[None, :], mask=tc_ok, other=0.0)
        acc2 = tl.dot(p.to(dv.dtype), dv, acc2 * alpha[:, None], input_precision=DOT_PREC)
        dv = tl.load(v_row[:, None] + 3 * DE + offs_c[None, :], mask=tc_ok, other=0.0)
        acc3 = tl.dot(p.to(dv.dtype), dv, acc3 * alpha[:, None], input_precision=DOT_PREC)
    return acc0, acc1, acc2, acc3, m_new, l_i


@triton.jit
def _store_plane(acc, inv, dst, row_ok, offs_c, c_ok, s: tl.constexpr, DE: tl.constexpr):
    o = acc * inv[:, None]  # [M, DEP]
    tl.store(
        dst[:, None] + s * DE + offs_c[None, :],
        o.to(dst.dtype.element_ty),
        mask=row_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _hack_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,  # q [n,H,D]; chunk k/v [n,KVH,D]
    kc_ptr,
    vc_ptr,
    ks_ptr,
    km_ptr,
    vs_ptr,
    vm_ptr,
    vsum_ptr,  # pool tensors (contiguous)
    past_ptr,
    dk_ptr,
    dv_ptr,
    out_ptr,  # past_pages [m] int32; dense k/v [KVH,T,D]; out [n,H,D]
    n_tok,
    n_past,
    dense_len,
    qk_scale,
    n_sink,
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
    G: tl.constexpr,
    GP: tl.constexpr,
    BT: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DEP: tl.constexpr,
    BITS: tl.constexpr,
    GV: tl.constexpr,
    INT8: tl.constexpr,
    INT8_QK_DOT: tl.constexpr,
    DENSE_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FAST: tl.constexpr,
):
    tile, kvh = tl.program_id(0), tl.program_id(1)
    KVH = tl.num_programs(1)
    E: tl.constexpr = 8 // BITS
    DE: tl.constexpr = HEAD_DIM // E
    NG: tl.constexpr = HEAD_DIM // GV
    M: tl.constexpr = BT * GP
    HALF: tl.constexpr = ((1 << BITS) - 1) / 2

    offs_m = tl.arange(0, M)
    row_t = tile * BT + offs_m // GP  # [M] token of each row
    row_g = offs_m % GP
    row_ok = (row_t < n_tok) & (row_g < G)
    q_row = q_ptr + row_t.to(tl.int64) * stride_qt + (kvh * G + row_g) * stride_qh  # [M]
    offs_c = tl.arange(0, DEP)  # channels of a plane, >= DE padding
    c_ok = offs_c < DE
    offs_d = tl.arange(0, BLOCK_D)  # channels of a head, >= HEAD_DIM padding
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, PAGE)
    pc_ok = (offs_p >= 0)[:, None] & c_ok[None, :]  # [P, DEP]
    all_p = offs_p >= 0  # [P] every slot of a page exists
    all_rows = offs_m[:, None] >= 0  # [M, 1] one page per step: every row sees it

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc0 = tl.zeros([M, DEP], tl.float32)
    acc1 = tl.zeros([M, DEP], tl.float32)
    acc2 = tl.zeros([M, DEP], tl.float32)
    acc3 = tl.zeros([M, DEP], tl.float32)

    # ---- quantized past pages, one per step.
    for j in range(0, n_past):
        row = tl.load(past_ptr + j).to(tl.int64) * KVH + kvh  # pool (page, kv head) row
        tok_row = row * PAGE + offs_p  # [P]
        kc = tl.load(
            kc_ptr + tok_row[:, None] * DE + offs_c[None, :], mask=pc_ok, other=0
        )  # [P, DEP]
        vc = tl.load(vc_ptr + tok_row[:, None] * DE + offs_c[None, :], mask=pc_ok, other=0)
        sc = tl.zeros([M, PAGE], tl.float32)
        qm = tl.zeros([M], tl.float32)
        for s in tl.static_range(E):
            ch = s * DE + offs_c
            qs = tl.load(
                q_row[:, None] + ch[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0
            ).to(tl.float32)
            qs = qs * qk_scale  # [M, DEP]
            kss = tl.load(ks_ptr + row * HEAD_DIM + ch, mask=c_ok, other=0.0).to(
                tl.float32
            )  # [DEP]
            kms = tl.load(km_ptr + row * HEAD_DIM + ch, mask=c_ok, other=0.0).to(tl.float32)
            qm += tl.sum(qs * kms[None, :], axis=1)
            qt = qs * kss[None, :]  # q~ [M, DEP]
            if INT8:
                sig = tl.max(tl.abs(qt), axis=1) / 127.0  # [M]
                q8 = tl.floor(qt / tl.where(sig > 0.0, sig, 1.0)[:, None] + 0.5)
                if INT8_QK_DOT:
                    code = _unpack(kc, s, BITS, tl.int8, FAST)  # [P, DEP]
                    d = tl.dot(q8.to(tl.int8), tl.trans(code), out_dtype=tl.int32).to(tl.float32)
                else:  # exact integers in fp16 (the int8 MMA needs K >= 32)
                    code = _unpack(kc, s, BITS, tl.float16, FAST)
                    d = tl.dot(q8.to(tl.float16), tl.trans(code))
                sc += sig[:, None] * (d - HALF * tl.sum(q8, axis=1)[:, None])
                qm += HALF * tl.sum(qt, axis=1)
            else:
                sc = tl.dot(qt.to(tl.float16), tl.trans(_unpack(kc, s, BITS, tl.float16, FAST)), sc)
        pos_ok = (j * PAGE + offs_p) >= n_sink  # sinks are attended through dense_k
        sc = tl.where(pos_ok[None, :], sc + qm[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])  # [M, P]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        vrow = vsum_ptr + row * HEAD_DIM + offs_m * 0  # [M] v_sums row (the same for every row)
        r_ok = offs_m >= 0  # [M] the page exists for every row
        pv, sg, cr, ad = _v_group(
            p, vs_ptr, vm_ptr, tok_row, all_p, all_rows, 0, NG, PAGE, HALF, INT8
        )
        acc0 = _v_plane(
            acc0, alpha, pv, sg, cr, ad, vc, vrow, r_ok, offs_c, c_ok, 0, BITS, DE, INT8, FAST
        )
        pv, sg, cr, ad = _v_group(
            p, vs_ptr, vm_ptr, tok_row, all_p, all_rows, DE // GV, NG, PAGE, HALF, INT8
        )
        acc1 = _v_plane(
            acc1, alpha, pv, sg, cr, ad, vc, vrow, r_ok, offs_c, c_ok, 1, BITS, DE, INT8, FAST
        )
        if E == 4:
            pv, sg, cr, ad = _v_group(
                p, vs_ptr, vm_ptr, tok_row, all_p, all_rows, 2 * DE // GV, NG, PAGE, HALF, INT8
            )
            acc2 = _v_plane(
                acc2, alpha, pv, sg, cr, ad, vc, vrow, r_ok, offs_c, c_ok, 2, BITS, DE, INT8, FAST
            )
            pv, sg, cr, ad = _v_group(
                p, vs_ptr, vm_ptr, tok_row, all_p, all_rows, 3 * DE // GV, NG, PAGE, HALF, INT8
            )
            acc3 = _v_plane(
                acc3, alpha, pv, sg, cr, ad, vc, vrow, r_ok, offs_c, c_ok, 3, BITS, DE, INT8, FAST
            )

    # ---- 16-bit past every row sees (sinks, open-page tokens before the chunk).
    q_full = tl.load(
        q_row[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )  # [M, BD]
    offs_t = tl.arange(0, DENSE_BLOCK)
    for start in range(0, dense_len, DENSE_BLOCK):
        t = start + offs_t
        t_ok = t < dense_len
        vis = row_ok[:, None] & t_ok[None, :]
        acc0, acc1, acc2, acc3, m_i, l_i = _dense_block(
            acc0,
            acc1,
            acc2,
            acc3,
            m_i,
            l_i,
            q_full,
            dk_ptr + kvh * stride_dkh + t * stride_dkt,
            dv_ptr + kvh * stride_dvh + t * stride_dvt,
            t_ok,
            vis,
            qk_scale,
            offs_c,
            c_ok,
            offs_d,
            d_ok,
            E,
            DE,
            DOT_PREC,
        )

    # ---- the chunk itself, causally: keys up to this tile's last token.
    hi = tl.minimum(n_tok, (tile + 1) * BT)
    for start in range(0, hi, DENSE_BLOCK):
        t = start + offs_t
        t_ok = t < hi
        vis = row_ok[:, None] & t_ok[None, :] & (t[None, :] <= row_t[:, None])
        acc0, acc1, acc2, acc3, m_i, l_i = _dense_block(
            acc0,
            acc1,
            acc2,
            acc3,
            m_i,
            l_i,
            q_full,
            k_ptr + kvh * stride_kh + t.to(tl.int64) * stride_kt,
            v_ptr + kvh * stride_vh + t.to(tl.int64) * stride_vt,
            t_ok,
            vis,
            qk_scale,
            offs_c,
            c_ok,
            offs_d,
            d_ok,
            E,
            DE,
            DOT_PREC,
        )

    # every valid row sees at least its own token, so l_i > 0 there
    inv = 1.0 / tl.where(row_ok, l_i, 1.0)
    dst = out_ptr + row_t.to(tl.int64) * stride_ot + (kvh * G + row_g) * stride_oh  # [M]
    _store_plane(acc0, inv, dst, row_ok, offs_c, c_ok, 0, DE)
    _store_plane(acc1, inv, dst, row_ok, offs_c, c_ok, 1, DE)
    if E == 4:
        _store_plane(acc2, inv, dst, row_ok, offs_c, c_ok, 2, DE)
        _store_plane(acc3, inv, dst, row_ok, offs_c, c_ok, 3, DE)
