"""The HACK decode attention Triton kernel: attention on 2/4-bit codes, nothing dequantized.

The wrapper (argument checks, splits, launch, merge) is hack_decode_attention.py, whose docstring
gives the arguments and the layout; this module holds the @triton.jit code and its math.

Math, nothing dequantized.  Page j: s_t = sum_c (q_c sK_jc) k'_tc + q . mK_j (q~ = q * sK_j, a per-page
constant); o_c = sum_t (p_t sV_tg) v'_tc + sum_t p_t mV_tg (p~ = p * sV, g = V group of channel c).
  "f16":  q~, p~ rounded to fp16, codes to fp16 (exact), tl.dot with fp32 accumulation.  Reads no sums.
  "int8": (HACK) q~ quantized symmetrically per (query head, page, plane of DE channels):
          q' = floor(q~ / sq + 0.5), sq = max|q~| / 127; s_t = sum_planes sq q'.(k' - h) + h sum q~ + q . mK.
          p~ quantized per (query head, page, V group) over the page's P tokens with zero point -128:
          p' = floor(p~ / sp + 0.5) - 128, sp = max p~ / 255; sum_t p~ v' ~= sp sum_t (p' + 128)(v' - h)
          + h sum_t p~, evaluated with the int8 dot p'.v' and the stored v_sums (formula at _v_plane).
          Centring codes on h (free: a row sum of q' / p') halves the requantization error.  Masked
          slots (sinks) have p~ = 0 -> p' = -128, cancelled exactly.  k_sums are not needed (symmetric q').
          QK uses the fp16 MMA on the exact integers when DE < 32 (the int8 MMA needs K >= 32).  All
          roundings are invariant to the running softmax max, so the reference reproduces them.
Dense tail: plain 16-bit attention in q's dtype.

Kernel: grid (B, KVH, 1 + num_splits).  A loop step covers NP pages (BLOCK_N = NP * P = 128..256 tokens).
q~ depends on the page, so the M dot rows are (page-in-step j, query head g), M = NP * GP >= 16 (GP >= G);
row (j, g) sees only page j's tokens, runs its own online softmax over pages j, j + NP, ..., and rows are
LSE-merged per head at the end (the rows GQA pads anyway carry other pages).  Per step: NP page ids, K/V
code tiles [BLOCK_N, DE] loaded once, E planes unpacked (_unpack), E dots [M, DE] x [DE, BLOCK_N] (QK)
and E dots [M, BLOCK_N] x [BLOCK_N, DE] (PV).  Split 0 runs only the dense tail (its own q, in the tail's
basis); page splits are 1..S; the S + 1 partials are merged by paged_decode_attention's merge kernel
(rotated_merge.py's when the pages are rotated).  head_dim: a multiple of 32 up to 256 (hack_layout.py); a plane
of DE channels that is not a power of two >= 16 (D = 32 at 2 bits, 96, 160, ...) runs in DEP = the next
power of two >= max(16, DE) wide tiles with channels >= DE masked on every load and store, the dense
tail in BLOCK_D (kernels/head_dim.py): padding lives in registers only.
"""

import triton
import triton.language as tl

from zipserve.kernels.hadamard_butterfly import hadamard_rotate_rows

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _unpack(codes, s: tl.constexpr, BITS: tl.constexpr, OUT: tl.constexpr, FAST: tl.constexpr):
    """Plane s of packed uint8 codes -> OUT (tl.float16 / tl.int8) exact small integers, same shape.

    FAST (NVIDIA only): inline PTX on 4 packed bytes.  f16: one shr, then per pair prmt + lop3 (c | 0x6400
    is fp16 1024 + c) + sub.f16x2 -> 1.75 instr/code instead of ~4.5 (byte extract, shift, mask, cvt,
    repack).  int8: shr + and per 4 codes.  The plain path is what the interpreter runs.
    """
    if FAST:
        m1: tl.constexpr = (1 << BITS) - 1
        if OUT == tl.float16:
            return tl.inline_asm_elementwise(
                asm=f"{{ .reg .b32 t, u, z, k; mov.b32 z, 0; mov.b32 k, 0x64006400;"
                f" shr.b32 t, $2, {s * BITS}; prmt.b32 u, t, z, 0x4140;"
                f" lop3.b32 u, u, {m1 * 0x10001}, k, 0xea; sub.f16x2 $0, u, k; prmt.b32 u, t, z, 0x4342;"
                f" lop3.b32 u, u, {m1 * 0x10001}, k, 0xea; sub.f16x2 $1, u, k; }}",
                constraints="=r,=r,r",
                args=[codes],
                dtype=tl.float16,
                is_pure=True,
                pack=4,
            )
        else:
            return tl.inline_asm_elementwise(
                asm=f"shr.b32 $0, $1, {s * BITS}; and.b32 $0, $0, {m1 * 0x01010101};",
                constraints="=r,r",
                args=[codes],
                dtype=tl.int8,
                is_pure=True,
                pack=4,
            )
    else:
        return ((codes >> (s * BITS)) & ((1 << BITS) - 1)).to(OUT)


@triton.jit
def _v_group(
    p,
    vs_ptr,
    vm_ptr,
    tok_row,
    ok_t,
    same_pg,
    grp: tl.constexpr,
    NG: tl.constexpr,
    PAGE: tl.constexpr,
    HALF: tl.constexpr,
    INT8: tl.constexpr,
):
    """p [M, N] -> PV operand of V group grp and per-row terms: (p~ or p', sig, corr, add), all [M]."""
    vs = tl.load(vs_ptr + tok_row * NG + grp, mask=ok_t, other=0.0).to(tl.float32)  # [N]
    vm = tl.load(vm_ptr + tok_row * NG + grp, mask=ok_t, other=0.0).to(tl.float32)  # [N]
    pt = p * vs[None, :]  # [M, N] p~ >= 0
    vmt = tl.sum(p * vm[None, :], axis=1)  # [M] sum_t p_t mV_tg
    if INT8:
        sig = tl.max(pt, axis=1) / 255.0  # [M]
        p8 = tl.minimum(tl.floor(pt / tl.where(sig > 0.0, sig, 1.0)[:, None] + 0.5), 255.0) - 128.0
        p8 = tl.where(same_pg, p8, 0.0)  # other pages' tokens: exactly 0
        corr = HALF * tl.sum(p8, axis=1) + 128.0 * PAGE * HALF  # see _v_plane
        add = HALF * tl.sum(pt, axis=1) + vmt
        pop = p8.to(tl.int8)
    else:
        pop, sig, corr, add = pt.to(tl.float16), vmt, vmt, vmt
    return pop, sig, corr, add


@triton.jit
def _v_plane(
    acc,
    alpha,
    pop,
    sig,
    corr,
    add,
    vc,
    vrow,
    r_ok,
    offs_c,
    c_ok,
    s: tl.constexpr,
    BITS: tl.constexpr,
    DE: tl.constexpr,
    INT8: tl.constexpr,
    FAST: tl.constexpr,
):
    """acc [M, DEP] (channels of plane s, c_ok the real ones) <- alpha * acc + p~ . V codes of plane s
    + min term.

    int8: sum_t p~ v' = sum_t p~ (v' - h) + h sum_t p~ ~= sig sum_t (p' + 128)(v' - h) + h sum_t p~
          = sig (p'.v' + 128 v_sums - h sum_t p' - 128 P h) + h sum_t p~   (exact integers in fp32).
    """
    acc = acc * alpha[:, None]
    if INT8:
        d = tl.dot(pop, _unpack(vc, s, BITS, tl.int8, FAST), out_dtype=tl.int32).to(
            tl.float32
        )  # [M, DE]
        vsum = tl.load(
            vrow[:, None] + s * DE + offs_c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0
        )  # [M, DEP]
        acc += sig[:, None] * (d + 128.0 * vsum - corr[:, None])
    else:
        acc = tl.dot(pop, _unpack(vc, s, BITS, tl.float16, FAST), acc)
    return acc + add[:, None]


@triton.jit
def _dense_pv(
    acc,
    alpha,
    p,
    dv_row,
    t_ok,
    offs_c,
    c_ok,
    s: tl.constexpr,
    DE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    dv = tl.load(
        dv_row[:, None] + s * DE + offs_c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0
    )  # [DB, DEP]
    return tl.dot(p.to(dv.dtype), dv, acc * alpha[:, None], input_precision=DOT_PREC)


@triton.jit
def _store_plane(
    acc,
    w,
    inv,
    dst,
    g_ok,
    offs_c,
    c_ok,
    s: tl.constexpr,
    NP: tl.constexpr,
    GP: tl.constexpr,
    DE: tl.constexpr,
    DEP: tl.constexpr,
):
    o = tl.sum(tl.reshape(acc, (NP, GP, DEP)) * w[:, :, None], axis=0) * inv[:, None]  # [GP, DEP]
    tl.store(
        dst[:, None] + s * DE + offs_c[None, :],
        o.to(dst.dtype.element_ty),
        mask=g_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _write_rotated_query(
    q_full,
    q_row,
    rot_ptr,
    dst_row,
    rows_ok,
    offs_d,
    d_ok,
    M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HADAMARD: tl.constexpr,
):
    """dst [M, D] f32 <- q [M, D] @ R [D, D] in fp32, rows_ok rows only: a Walsh-Hadamard
    butterfly on q_full (the rows already loaded, [M, BD]) when R is the codec's Hadamard
    (HADAMARD: its block), else an ieee dot with q and R read from memory in chunks of 16 so no
    [D, D] tile is ever held in registers."""
    if HADAMARD > 0:
        q = hadamard_rotate_rows(q_full.to(tl.float32), M, BLOCK_D, HADAMARD)
        tl.store(dst_row[:, None] + offs_d[None, :], q, mask=rows_ok[:, None] & d_ok[None, :])
        return
    KC: tl.constexpr = 16
    offs_k = tl.arange(0, KC)
    acc = tl.zeros([M, BLOCK_D], tl.float32)
    for k0 in range(0, BLOCK_D, KC):
        kk = k0 + offs_k
        k_ok = kk < HEAD_DIM
        qc = tl.load(q_row[:, None] + kk[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        rc = tl.load(
            rot_ptr + kk[:, None] * HEAD_DIM + offs_d[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [KC, BD]
        acc += tl.dot(qc.to(tl.float32), rc, input_precision="ieee")
    tl.store(dst_row[:, None] + offs_d[None, :], acc, mask=rows_ok[:, None] & d_ok[None, :])


@triton.jit
def _hack_decode_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    ks_ptr,
    km_ptr,
    vs_ptr,
    vm_ptr,
    vsum_ptr,  # q [B,H,D]; pool tensors (contiguous)
    pt_ptr,
    np_ptr,
    dk_ptr,
    dv_ptr,
    dl_ptr,  # page_table [B,MP], n_pages [B], dense k/v [R,KVH,T,D], lens [B]
    qd_ptr,
    drow_ptr,
    dstart_ptr,  # q of the dense tail [B,H,D]; tail row [B] and first column [B] in dense k/v
    part_ptr,
    lse_ptr,  # part f32 [B,H,1+S,D]; lse f32 [B,H,1+S] (log2 domain); partial 0 = dense tail
    rot_ptr,
    qrot_ptr,  # WRITE_QROT: R f32 [D,D] and the pages' query q R f32 [B,H,D] the tail program writes
    qk_scale,
    n_sink,
    stride_qb,
    stride_qh,
    stride_qdb,
    stride_qdh,
    stride_ptb,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    G: tl.constexpr,
    GP: tl.constexpr,
    NP: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DEP: tl.constexpr,
    BITS: tl.constexpr,
    GV: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    INT8: tl.constexpr,
    INT8_QK_DOT: tl.constexpr,
    DENSE_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    FAST: tl.constexpr,
    WRITE_QROT: tl.constexpr = False,
    QROT_HADAMARD: tl.constexpr = 0,
):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    KVH = tl.num_programs(1)
    E: tl.constexpr = 8 // BITS
    DE: tl.constexpr = HEAD_DIM // E
    NG: tl.constexpr = HEAD_DIM // GV
    M: tl.constexpr = NP * GP
    BLOCK_N: tl.constexpr = NP * PAGE
    HALF: tl.constexpr = ((1 << BITS) - 1) / 2  # code centre h (int8 mode)

    offs_m = tl.arange(0, M)
    row_j = offs_m // GP  # page-in-step of score row
    row_g = offs_m % GP  # query head (within the group) of score row
    row_ok = row_g < G
    q_row = q_ptr + b * stride_qb + (kvh * G + row_g) * stride_qh  # [M] pointers
    offs_c = tl.arange(0, DEP)  # channels of a plane, >= DE padding
    c_ok = offs_c < DE
    offs_n = tl.arange(0, BLOCK_N)
    slot = offs_n % PAGE
    offs_p = tl.arange(0, NP)
    same_pg = row_j[:, None] == (offs_n // PAGE)[None, :]  # [M, N]

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc0 = tl.zeros([M, DEP], tl.float32)
    acc1 = tl.zeros([M, DEP], tl.float32)
    acc2 = tl.zeros([M, DEP], tl.float32)
    acc3 = tl.zeros([M, DEP], tl.float32)

    # ---- dense 16-bit tail (sinks + open page): program split 0 alone, rows j == 0 only, read in
    # place (row drow[b] of dense k/v from column dstart[b]), with q in the tail's basis.
    dl = tl.where(split == 0, tl.load(dl_ptr + b), 0)
    d_base = tl.load(drow_ptr + b).to(tl.int64)
    d_col = tl.load(dstart_ptr + b)
    offs_t = tl.arange(0, DENSE_BLOCK)
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    d_ok = offs_d < HEAD_DIM
    qd_row = qd_ptr + b * stride_qdb + (kvh * G + row_g) * stride_qdh  # [M] pointers
    q_full = tl.load(
        qd_row[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )  # [M, BD]
    if WRITE_QROT:
        if split == 0:  # the page splits' query, for the CUDA kernel launched after this one
            _write_rotated_query(
                q_full,
                qd_row,
                rot_ptr,
                qrot_ptr + (b * KVH * G + kvh * G + row_g) * HEAD_DIM,
                row_ok & (row_j == 0),
                offs_d,
                d_ok,
                M,
                HEAD_DIM,
                BLOCK_D,
                QROT_HADAMARD,
            )
    for start in range(0, dl, DENSE_BLOCK):
        t = start + offs_t
        t_ok = t < dl
        dk_row = dk_ptr + d_base * stride_dkb + kvh * stride_dkh + (d_col + t) * stride_dkt  # [DB]
        dv_row = dv_ptr + d_base * stride_dvb + kvh * stride_dvh + (d_col + t) * stride_dvt
        dk = tl.load(
            dk_row[:, None] + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0
        )  # [DB, BD]
        sc = tl.dot(q_full, tl.trans(dk), input_precision=DOT_PREC)  # [M, DB]
        sc = tl.where((row_j == 0)[:, None] & t_ok[None, :], sc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        acc0 = _dense_pv(acc0, alpha, p, dv_row, t_ok, offs_c, c_ok, 0, DE, DOT_PREC)
        acc1 = _dense_pv(acc1, alpha, p, dv_row, t_ok, offs_c, c_ok, 1, DE, DOT_PREC)
        if E == 4:
            acc2 = _dense_pv(acc2, alpha, p, dv_row, t_ok, offs_c, c_ok, 2, DE, DOT_PREC)
            acc3 = _dense_pv(acc3, alpha, p, dv_row, t_ok, offs_c, c_ok, 3, DE, DOT_PREC)

    # ---- quantized pages: page split `split - 1`'s range [lo, hi), whole steps of NP pages (none
    # for the dense program: its lo is past the end).
    n_pg = tl.load(np_ptr + b)
    steps_per_split = tl.cdiv(tl.cdiv(n_pg, NP), NUM_SPLITS)
    lo = tl.where(split == 0, n_pg, (split - 1) * steps_per_split * NP)
    hi = tl.minimum(lo + steps_per_split * NP, n_pg)
    pt_row = pt_ptr + b * stride_ptb
    for blk in range(lo, hi, NP):
        pg = blk + offs_p  # [NP] logical page index
        pg_ok = pg < hi
        rows_p = (
            tl.load(pt_row + pg, mask=pg_ok, other=0).to(tl.int64) * KVH + kvh
        )  # [NP] pool rows
        row_t = tl.reshape(tl.broadcast_to(rows_p[:, None], (NP, PAGE)), (BLOCK_N,))  # [N]
        ok_t = tl.reshape(tl.broadcast_to(pg_ok[:, None], (NP, PAGE)), (BLOCK_N,))  # [N]
        row_r = tl.reshape(tl.broadcast_to(rows_p[:, None], (NP, GP)), (M,))  # [M]
        r_ok = tl.reshape(
            tl.broadcast_to(pg_ok[:, None], (NP, GP)), (M,)
        )  # [M] (pool garbage may be NaN)
        tok_row = row_t * PAGE + slot  # [N] (page, head, token) row
        vrow = vsum_ptr + row_r * HEAD_DIM  # [M] v_sums row of each score row
        pos_ok = ok_t & ((blk * PAGE + offs_n) >= n_sink)  # sinks live in the dense tail
        tc_ok = ok_t[:, None] & c_ok[None, :]  # [N, DEP]
        kc = tl.load(kc_ptr + tok_row[:, None] * DE + offs_c[None, :], mask=tc_ok, other=0)
        vc = tl.load(vc_ptr + tok_row[:, None] * DE + offs_c[None, :], mask=tc_ok, other=0)

        sc = tl.zeros([M, BLOCK_N], tl.float32)
        qm = tl.zeros([M], tl.float32)
        rc_ok = r_ok[:, None] & c_ok[None, :]  # [M, DEP]
        for s in tl.static_range(E):
            ch = s * DE + offs_c[None, :]
            qs = (
                tl.load(q_row[:, None] + ch, mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(
                    tl.float32
                )
                * qk_scale
            )
            kss = tl.load(
                ks_ptr + row_r[:, None] * HEAD_DIM + ch, mask=rc_ok, other=0.0
            )  # [M, DEP]
            kms = tl.load(km_ptr + row_r[:, None] * HEAD_DIM + ch, mask=rc_ok, other=0.0)
            qm += tl.sum(qs * kms.to(tl.float32), axis=1)
            qt = qs * kss.to(tl.float32)  # q~ [M, DE]
            if INT8:
                sig = tl.max(tl.abs(qt), axis=1) / 127.0  # [M]
                q8 = tl.floor(qt / tl.where(sig > 0.0, sig, 1.0)[:, None] + 0.5)
                if INT8_QK_DOT:
                    code = _unpack(kc, s, BITS, tl.int8, FAST)  # [N, DEP]
                    d = tl.dot(q8.to(tl.int8), tl.trans(code), out_dtype=tl.int32).to(tl.float32)
                else:  # exact integers in fp16, fp32 accumulation (int8 MMA needs K >= 32)
                    code = _unpack(kc, s, BITS, tl.float16, FAST)
                    d = tl.dot(q8.to(tl.float16), tl.trans(code))
                sc += sig[:, None] * (d - HALF * tl.sum(q8, axis=1)[:, None])  # q'.(k' - h), exact
                qm += HALF * tl.sum(qt, axis=1)  # + h sum_c q~_c
            else:
                sc = tl.dot(qt.to(tl.float16), tl.trans(_unpack(kc, s, BITS, tl.float16, FAST)), sc)
        sc = tl.where(same_pg & pos_ok[None, :], sc + qm[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a page this step
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])  # [M, N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        # PV: planes in order; a new p~ operand whenever a plane starts a new V group (GV % DE == 0).
        pv, sg, cr, ad = _v_group(
            p, vs_ptr, vm_ptr, tok_row, ok_t, same_pg, 0, NG, PAGE, HALF, INT8
        )
        acc0 = _v_plane(
            acc0, alpha, pv, sg, cr, ad, vc, vrow, r_ok, offs_c, c_ok, 0, BITS, DE, INT8, FAST
        )
        if DE % GV == 0:
            pv, sg, cr, ad = _v_group(
                p, vs_ptr, vm_ptr, tok_row, ok_t, same_pg, DE // GV, NG, PAGE, HALF, INT8
            )
        acc1 = _v_plane(
            acc1, alpha, pv, sg, cr, ad, vc, vrow, r_ok, offs_c, c_ok, 1, BITS, DE, INT8, FAST
        )
        if E == 4:
            if (2 * DE) % GV == 0:
                pv, sg, cr, ad = _v_group(
                    p, vs_ptr, vm_ptr, tok_row, ok_t, same_pg, 2 * DE // GV, NG, PAGE, HALF, INT8
                )
            acc2 = _v_plane(
                acc2, alpha, pv, sg, cr, ad, vc, vrow, r_ok, offs_c, c_ok, 2, BITS, DE, INT8, FAST
            )
            if (3 * DE) % GV == 0:
                pv, sg, cr, ad = _v_group(
                    p, vs_ptr, vm_ptr, tok_row, ok_t, same_pg, 3 * DE // GV, NG, PAGE, HALF, INT8
                )
            acc3 = _v_plane(
                acc3, alpha, pv, sg, cr, ad, vc, vrow, r_ok, offs_c, c_ok, 3, BITS, DE, INT8, FAST
            )

    # ---- merge the NP row streams of each query head (LSE), normalise, store.
    m3 = tl.reshape(m_i, (NP, GP))
    mg = tl.max(m3, axis=0)  # [GP]
    mg = tl.where(mg == float("-inf"), 0.0, mg)
    w = tl.exp2(m3 - mg[None, :])  # [NP, GP]; 0 for empty streams
    lg = tl.sum(tl.reshape(l_i, (NP, GP)) * w, axis=0)  # [GP]
    nonempty = lg > 0.0
    inv = 1.0 / tl.where(nonempty, lg, 1.0)
    offs_g = tl.arange(0, GP)
    g_ok = offs_g < G
    heads = kvh * G + offs_g
    prow = (b * KVH * G + heads) * (NUM_SPLITS + 1) + split  # [GP] row in part / lse
    dst = part_ptr + prow * HEAD_DIM
    lse = tl.where(nonempty, mg + tl.log2(tl.where(nonempty, lg, 1.0)), float("-inf"))
    tl.store(lse_ptr + prow, lse, mask=g_ok)
    _store_plane(acc0, w, inv, dst, g_ok, offs_c, c_ok, 0, NP, GP, DE, DEP)
    _store_plane(acc1, w, inv, dst, g_ok, offs_c, c_ok, 1, NP, GP, DE, DEP)
    if E == 4:
        _store_plane(acc2, w, inv, dst, g_ok, offs_c, c_ok, 2, NP, GP, DE, DEP)
        _store_plane(acc3, w, inv, dst, g_ok, offs_c, c_ok, 3, NP, GP, DE, DEP)
