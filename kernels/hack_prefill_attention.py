"""Chunked-prefill attention of one sequence's new tokens over its cached HACK pages.

``hack_prefill_attention`` (Triton kernel + wrapper) and ``hack_prefill_attention_ref`` (torch fp32, same
signature, same math).  Layout of ``pages``: hack_layout.py (P = page_size, E = 8 // bits, DE = D // E,
GV = group_v, NG = D // GV, h = (2^b - 1) / 2).
  q [n, H, D] fp16/bf16/fp32: the chunk's queries (head h uses kv head h // G, G = H // KVH);
  k, v [n, KVH, D] (q's dtype): the chunk's own keys/values, attended causally (query i sees 0..i);
  pages + past_pages [m] int32: the sequence's full quantized pages before the chunk, in order
    (positions [0, m * P)); positions < n_sink of the first page are masked (they live in dense_k);
  dense_k, dense_v [KVH, T, D] (q's dtype): 16-bit past tokens every query sees in full (the sinks,
    and any open-page tokens before a chunk that starts mid-page); T may be 0.
  Returns out [n, H, D] in q's dtype.  Token order inside a set does not matter: RoPE is already in K.

Math: the decode kernel's (hack_decode_kernel.py), nothing dequantized.  Page j, query row r:
  s_rt = sum_c (q_rc sK_jc) k'_tc + q_r . mK_j;  o_rc = sum_t (p_rt sV_tg) v'_tc + sum_t p_rt mV_tg.
  "f16":  q~ = q * sK and p~ = p * sV rounded to fp16, codes exact in fp16, fp32 accumulation.
  "int8": q~ quantized to int8 per (row, page, plane), p~ per (row, page, V group) with zero point -128,
          centred codes and the stored v_sums as the rank-1 correction (formulas in the decode module,
          whose _v_group / _v_plane / _unpack this kernel calls).
The chunk's K/V and dense_k/v take a plain 16-bit flash-attention path.  One online softmax covers all
three sets, so no LSE merge is needed.

Kernel: grid (cdiv(n, BT), KVH).  A program owns BT tokens x GP query heads of one kv head (M = BT * GP
rows, GP = next power of two >= G, rows g >= G masked): every row shares the kv head, so one loop step is
one page (q~ differs per page but not per row) with E dots [M, DE] x [DE, P] for QK and E dots
[M, P] x [P, DE] for PV, then the dense past, then the chunk's keys up to the tile's last token.
No split along the past: a prefill chunk has n * KVH / BT programs already.  head_dim: as the decode
kernel (a multiple of 32 up to 256; planes padded to DEP, the dense parts to BLOCK_D, padding masked).
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES, is_pow2
from zipserve.kernels.hack_decode_attention import plane_width
from zipserve.kernels.hack_decode_kernel import _unpack, _v_group, _v_plane
from zipserve.kernels.hack_layout import HackPages, check_bits, unpack_planar
from zipserve.kernels.head_dim import block_d, head_dim_ok
from zipserve.kernels.paged_decode_attention import is_interpreted, require_runnable

__all__ = ["hack_prefill_attention", "hack_prefill_attention_ref", "check_prefill_args"]

_LOG2E = 1.4426950408889634
_MODES = ("f16", "int8")


def check_prefill_args(
    q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink, mode, out
):
    """Validate hack_prefill_attention(_ref) arguments -> (n, H, KVH, P, D); ValueError names the argument."""
    if not isinstance(pages, HackPages):
        raise ValueError(f"pages: must be a HackPages pool, got {type(pages).__name__}")
    pages.validate()
    if check_bits(bits) != pages.bits:
        raise ValueError(f"bits: {bits} does not match pages.bits={pages.bits}")
    if mode not in _MODES:
        raise ValueError(f"mode: must be one of {_MODES}, got {mode!r}")
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"q: must be [n, num_heads, head_dim] of {FLOAT_DTYPES}, got "
            f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}"
        )
    (n, H, D), KVH, P, E = q.shape, pages.num_kv_heads, pages.page_size, 8 // pages.bits
    checks = [
        (pages.head_dim == D, "head_dim", f"pages head_dim {pages.head_dim} != q head_dim {D}"),
        (
            head_dim_ok(D) and D % E == 0,
            "head_dim",
            f"must be an even number in [8, 256] and a multiple of {E}, got {D}",
        ),
        (is_pow2(P) and P >= 16, "pages", f"page_size must be a power of two >= 16, got {P}"),
        (
            pages.group_v % (D // E) == 0,
            "pages",
            f"group_v {pages.group_v} must be a multiple of D / E = {D // E}",
        ),
        (H % KVH == 0, "num_heads", f"q num_heads {H} is not a multiple of num_kv_heads {KVH}"),
        (
            isinstance(past_pages, torch.Tensor)
            and past_pages.dtype == torch.int32
            and past_pages.dim() == 1
            and past_pages.is_contiguous(),
            "past_pages",
            f"must be a contiguous int32 [m] tensor, got {getattr(past_pages, 'dtype', type(past_pages).__name__)}"
            f" {tuple(getattr(past_pages, 'shape', ()))}",
        ),
    ]
    for name, t in (("k", k), ("v", v)):
        checks.append(
            (
                isinstance(t, torch.Tensor)
                and t.dtype == q.dtype
                and tuple(t.shape) == (n, KVH, D),
                name,
                f"must be {q.dtype} [n={n}, KVH={KVH}, D={D}], got "
                f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}",
            )
        )
    for name, t in (("dense_k", dense_k), ("dense_v", dense_v)):
        checks.append(
            (
                isinstance(t, torch.Tensor)
                and t.dtype == q.dtype
                and t.dim() == 3
                and t.shape == dense_k.shape
                and t.shape[0] == KVH
                and t.shape[2] == D,
                name,
                f"must be {q.dtype} [KVH={KVH}, T, D={D}] (same for k and v), got "
                f"{getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}",
            )
        )
    for ok, name, msg in checks:
        if not ok:
            raise ValueError(f"{name}: {msg}")
    checks = []
    for name, t in (
        ("pages", pages.k_codes),
        ("past_pages", past_pages),
        ("k", k),
        ("v", v),
        ("dense_k", dense_k),
        ("dense_v", dense_v),
    ):
        checks.append((t.device == q.device, name, f"is on {t.device}, q is on {q.device}"))
    for name, t in (("q", q), ("k", k), ("v", v), ("dense_k", dense_k), ("dense_v", dense_v)):
        checks.append(
            (
                t.numel() == 0 or t.stride(-1) == 1,
                name,
                f"needs a contiguous last dim, strides {t.stride()}",
            )
        )
    checks += [
        (
            isinstance(scale, (int, float)) and not isinstance(scale, bool),
            "scale",
            f"must be a python float, got {type(scale).__name__}",
        ),
        (
            isinstance(n_sink, int) and not isinstance(n_sink, bool) and 0 <= n_sink <= P,
            "n_sink",
            f"must be an int in [0, {P}], got {n_sink!r}",
        ),
    ]
    if out is not None:
        checks.append(
            (
                isinstance(out, torch.Tensor)
                and out.shape == q.shape
                and out.dtype == q.dtype
                and out.device == q.device
                and (out.numel() == 0 or out.stride(-1) == 1),
                "out",
                f"must match q ({tuple(q.shape)}, {q.dtype}, {q.device}, contiguous last dim)",
            )
        )
    for ok, name, msg in checks:
        if not ok:
            raise ValueError(f"{name}: {msg}")
    return n, H, KVH, P, D


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


def _launch_config(group: int) -> tuple[int, int, int]:
    """Fixed heuristic (no autotune) -> (BT tokens per program, GP padded group, num_warps): M = 64 rows."""
    gp = triton.next_power_of_2(group)
    bt = max(1, 64 // gp)
    return bt, gp, 4


def hack_prefill_attention(
    q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink=4, mode="f16", out=None
):
    """Chunk attention over HACK pages + dense past + itself (causal).  Shapes: module docstring."""
    n, H, KVH, P, D = check_prefill_args(
        q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink, mode, out
    )
    require_runnable("hack_prefill_attention", _hack_prefill_kernel, q)
    if out is None:
        out = torch.empty_like(q)
    if n == 0 or H == 0:
        return out
    G = H // KVH
    bt, gp, num_warps = _launch_config(G)
    _hack_prefill_kernel[(triton.cdiv(n, bt), KVH)](
        q,
        k,
        v,
        pages.k_codes,
        pages.v_codes,
        pages.k_scale,
        pages.k_min,
        pages.v_scale,
        pages.v_min,
        pages.v_sums,
        past_pages,
        dense_k,
        dense_v,
        out,
        n,
        past_pages.numel(),
        dense_k.shape[1],
        float(scale) * _LOG2E,
        n_sink,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dense_k.stride(0),
        dense_k.stride(1),
        dense_v.stride(0),
        dense_v.stride(1),
        out.stride(0),
        out.stride(1),
        G=G,
        GP=gp,
        BT=bt,
        PAGE=P,
        HEAD_DIM=D,
        BLOCK_D=block_d(D),
        DEP=plane_width(D, pages.bits),
        BITS=pages.bits,
        GV=pages.group_v,
        INT8=mode == "int8",
        INT8_QK_DOT=plane_width(D, pages.bits) >= 32,
        DENSE_BLOCK=64,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        FAST=q.is_cuda and torch.version.hip is None and not is_interpreted(_hack_prefill_kernel),
        num_warps=num_warps,
        num_stages=2,
    )
    return out


def hack_prefill_attention_ref(
    q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink=4, mode="f16", out=None
):
    """Torch fp32 reference: the kernel's math and int8 roundings (fp16 roundings of the f16 mode skipped)."""
    n, H, KVH, P, D = check_prefill_args(
        q, k, v, pages, past_pages, dense_k, dense_v, scale, bits, n_sink, mode, out
    )
    G, E, GV = H // KVH, 8 // pages.bits, pages.group_v
    DE, NG = D // E, D // GV
    qk, half = float(scale) * _LOG2E, ((1 << pages.bits) - 1) / 2.0
    qf = q.float().view(n, KVH, G, D).permute(1, 0, 2, 3) * qk  # [KVH, n, G, D] log2 domain
    ids = past_pages.long()
    m = ids.numel()
    kc = unpack_planar(pages.k_codes[ids], pages.bits).float()  # [m, KVH, P, D]
    ks, km = pages.k_scale[ids].float(), pages.k_min[ids].float()  # [m, KVH, D]
    s_pages = []
    for j in range(m):  # one page at a time keeps the reference's memory O(n H P)
        qt = qf * ks[j, :, None, None, :]  # q~ [KVH, n, G, D]
        if mode == "int8":
            qt5 = qt.view(KVH, n, G, E, DE)
            sig = qt5.abs().amax(-1) / 127.0  # [KVH, n, G, E]
            q8 = torch.floor(qt5 / torch.where(sig > 0, sig, 1.0)[..., None] + 0.5)
            d = torch.einsum("kngec,kpec->kngpe", q8, kc[j].view(KVH, P, E, DE) - half)
            s = (d * sig[:, :, :, None, :]).sum(-1) + half * qt.sum(-1)[..., None]  # [KVH, n, G, P]
        else:
            s = torch.einsum("kngd,kpd->kngp", qt, kc[j])
        s_pages.append(s + (qf * km[j, :, None, None, :]).sum(-1)[..., None])
    sq = torch.stack(s_pages, 3) if m else qf.new_zeros(KVH, n, G, 0, P)  # [KVH, n, G, m, P]
    if m and n_sink:
        sq[:, :, :, 0, :n_sink] = float("-inf")  # sinks are attended through dense_k
    sd = torch.einsum("kngd,ktd->kngt", qf, dense_k.float())  # [KVH, n, G, T]
    sc = torch.einsum("kngd,tkd->kngt", qf, k.float())  # [KVH, n, G, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    sc = sc.masked_fill(~causal[None, :, None, :], float("-inf"))
    mx = torch.cat([sq.flatten(3), sd, sc], -1).amax(-1)  # [KVH, n, G]
    pq = torch.exp2(sq - mx[..., None, None])  # [KVH, n, G, m, P]
    pd, pc = torch.exp2(sd - mx[..., None]), torch.exp2(sc - mx[..., None])
    l = pq.sum((3, 4)) + pd.sum(-1) + pc.sum(-1)  # noqa: E741  [KVH, n, G]
    o = torch.einsum("kngt,ktd->kngd", pd, dense_v.float()) + torch.einsum(
        "kngt,tkd->kngd", pc, v.float()
    )
    for j in range(m):
        vc = unpack_planar(pages.v_codes[ids[j]], pages.bits).float().view(KVH, P, NG, GV)
        vs, vm = pages.v_scale[ids[j]].float(), pages.v_min[ids[j]].float()  # [KVH, P, NG]
        pj = pq[:, :, :, j]  # [KVH, n, G, P]
        pt = pj[..., None] * vs[:, None, None]  # p~ [KVH, n, G, P, NG]
        vmt = (pj[..., None] * vm[:, None, None]).sum(3)  # [KVH, n, G, NG]
        if mode == "int8":
            sig = pt.amax(3) / 255.0  # [KVH, n, G, NG]
            p8 = (
                torch.floor(pt / torch.where(sig > 0, sig, 1.0)[:, :, :, None] + 0.5).clamp_max(255)
                - 128
            )
            d = torch.einsum("kngpj,kpjc->kngjc", p8, vc)  # [KVH, n, G, NG, GV]
            vsum = pages.v_sums[ids[j]].float().view(KVH, 1, 1, NG, GV)
            cent = d - half * p8.sum(3)[..., None] + 128.0 * (vsum - P * half)
            oq = sig[..., None] * cent + (half * pt.sum(3) + vmt)[..., None]
        else:
            oq = torch.einsum("kngpj,kpjc->kngjc", pt, vc) + vmt[..., None]
        o = o + oq.reshape(KVH, n, G, D)
    res = (o / l[..., None]).permute(1, 0, 2, 3).reshape(n, H, D)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out
