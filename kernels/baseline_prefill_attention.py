"""Chunked-prefill attention over the baselines' cached pages: fp8 (e4m3) and KIVI 2/4-bit.

  * ``fp8_prefill_attention`` / ``fp8_prefill_attention_ref``
  * ``kivi_prefill_attention`` / ``kivi_prefill_attention_ref``
Triton kernel + host wrapper, and a pure-torch fp32 reference with the same signature, for each.
Pool layouts: fp8_decode_attention.py and kivi_decode_attention.py.  Call inputs (both formats):
  q [n, H, D] fp16/bf16/fp32: the chunk's queries (head h uses kv head h // G, G = H // KVH);
  k, v [n, KVH, D] (q's dtype): the chunk's own keys/values, attended causally (query i sees 0..i);
  past_pages [m] int32: the sequence's full pages before the chunk, in order (every token attended:
    the baselines keep no sinks);
  dense_k, dense_v [KVH, T, D] (q's dtype): 16-bit past tokens every query sees (open-page tokens
    before a chunk that starts mid-page); T may be 0.
  Returns out [n, H, D] in q's dtype.

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

import torch
import triton
import triton.language as tl

from zipserve.compress.quantize import dequant_k, dequant_v
from zipserve.kernels.arg_checks import FLOAT_DTYPES, is_pow2
from zipserve.kernels.decode_steps import _softmax_update
from zipserve.kernels.hack_layout import check_bits, unpack_planar
from zipserve.kernels.head_dim import block_d, head_dim_error, head_dim_ok
from zipserve.kernels.paged_decode_attention import require_runnable

__all__ = [
    "fp8_prefill_attention",
    "fp8_prefill_attention_ref",
    "kivi_prefill_attention",
    "kivi_prefill_attention_ref",
]

_LOG2E = 1.4426950408889634
_FP8 = torch.float8_e4m3fn


def _shape(t) -> str:
    return f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"


def _check_call(
    q, k, v, past_pages, dense_k, dense_v, scale, out, kvh, page, pool_name, pool_device
):
    """Checks shared by both formats (everything but the pool's own layout) -> (n, H, D)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q: must be [n, num_heads, head_dim] of {FLOAT_DTYPES}, got {_shape(q)}")
    n, H, D = q.shape
    checks = [
        (head_dim_ok(D), "head_dim", head_dim_error(D, "q head_dim")),
        (
            is_pow2(page) and page >= 16,
            pool_name,
            f"page_size must be a power of two >= 16, got {page}",
        ),
        (
            kvh > 0 and H % kvh == 0,
            "num_heads",
            f"q num_heads {H} is not a multiple of num_kv_heads {kvh}",
        ),
        (
            isinstance(past_pages, torch.Tensor)
            and past_pages.dtype == torch.int32
            and past_pages.dim() == 1
            and past_pages.is_contiguous(),
            "past_pages",
            f"must be a contiguous int32 [m], got {_shape(past_pages)}",
        ),
    ]
    for name, t in (("k", k), ("v", v)):
        checks.append(
            (
                isinstance(t, torch.Tensor)
                and t.dtype == q.dtype
                and tuple(t.shape) == (n, kvh, D),
                name,
                f"must be {q.dtype} [n={n}, KVH={kvh}, D={D}], got {_shape(t)}",
            )
        )
    for name, t in (("dense_k", dense_k), ("dense_v", dense_v)):
        checks.append(
            (
                isinstance(t, torch.Tensor)
                and t.dtype == q.dtype
                and t.dim() == 3
                and t.shape == dense_k.shape
                and t.shape[0] == kvh
                and t.shape[2] == D,
                name,
                f"must be {q.dtype} [KVH={kvh}, T, D={D}] (same for k and v), got {_shape(t)}",
            )
        )
    for ok, name, msg in checks:
        if not ok:
            raise ValueError(f"{name}: {msg}")
    for name, t in (
        (pool_name, pool_device),
        ("past_pages", past_pages.device),
        ("k", k.device),
        ("v", v.device),
        ("dense_k", dense_k.device),
        ("dense_v", dense_v.device),
    ):
        if t != q.device:
            raise ValueError(f"{name}: is on {t}, q is on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v), ("dense_k", dense_k), ("dense_v", dense_v)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: needs a contiguous last dim, strides {t.stride()}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale: must be a python float, got {type(scale).__name__}")
    if out is not None and not (
        isinstance(out, torch.Tensor)
        and out.shape == q.shape
        and out.dtype == q.dtype
        and out.device == q.device
        and (out.numel() == 0 or out.stride(-1) == 1)
    ):
        raise ValueError(
            f"out: must match q ({tuple(q.shape)}, {q.dtype}, {q.device}, contiguous last dim)"
        )
    return n, H, D


def _check_fp8(
    q, k, v, k_pages, k_scale, v_pages, v_scale, past_pages, dense_k, dense_v, scale, out
):
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if (
            not isinstance(t, torch.Tensor)
            or t.dtype != _FP8
            or t.dim() != 4
            or t.shape != k_pages.shape
        ):
            raise ValueError(
                f"{name}: must be float8_e4m3fn [num_pages, KVH, P, D] (same for k and v), "
                f"got {_shape(t)}"
            )
    N, KVH, P, D = k_pages.shape
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if (
            not isinstance(t, torch.Tensor)
            or t.dtype != torch.float32
            or tuple(t.shape) != (N, KVH)
        ):
            raise ValueError(f"{name}: must be float32 [num_pages={N}, KVH={KVH}], got {_shape(t)}")
    for name, t in (
        ("k_pages", k_pages),
        ("v_pages", v_pages),
        ("k_scale", k_scale),
        ("v_scale", v_scale),
    ):
        if t.device != k_pages.device or not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous and on {k_pages.device}")
    n, H, Dq = _check_call(
        q, k, v, past_pages, dense_k, dense_v, scale, out, KVH, P, "k_pages", k_pages.device
    )
    if Dq != D:
        raise ValueError(f"head_dim: k_pages head_dim {D} != q head_dim {Dq}")
    return n, H, KVH, P, D


def _check_kivi(
    q,
    k,
    v,
    k_codes,
    k_scale,
    k_min,
    v_codes,
    v_scale,
    v_min,
    past_pages,
    dense_k,
    dense_v,
    scale,
    bits,
    out,
):
    e = 8 // check_bits(bits)
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        if (
            not isinstance(t, torch.Tensor)
            or t.dtype != torch.uint8
            or t.dim() != 4
            or t.shape != k_codes.shape
        ):
            raise ValueError(
                f"{name}: must be uint8 [num_pages, KVH, P, D // {e}] (same for k and v), "
                f"got {_shape(t)}"
            )
    N, KVH, P, DE = k_codes.shape
    n, H, D = _check_call(
        q, k, v, past_pages, dense_k, dense_v, scale, out, KVH, P, "k_codes", k_codes.device
    )
    if DE * e != D:
        raise ValueError(
            f"bits: k_codes last dim {DE} != head_dim / (8 / bits) = {D} / {e} (bits={bits})"
        )
    for name, t in (("k_scale", k_scale), ("k_min", k_min), ("v_scale", v_scale), ("v_min", v_min)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float16 or t.dim() != 4:
            raise ValueError(f"{name}: must be a 4-d float16 tensor, got {_shape(t)}")
    ngk, ngv = k_scale.shape[2], v_scale.shape[3]
    if ngk == 0 or P % ngk or not is_pow2(P // ngk) or tuple(k_scale.shape) != (N, KVH, ngk, D):
        raise ValueError(
            f"k_scale: must be [N={N}, KVH={KVH}, P / token_group, D={D}] (power-of-two group), "
            f"got {tuple(k_scale.shape)}"
        )
    if ngv == 0 or D % ngv or not is_pow2(D // ngv) or tuple(v_scale.shape) != (N, KVH, P, ngv):
        raise ValueError(
            f"v_scale: must be [N={N}, KVH={KVH}, P={P}, D / channel_group] (power-of-two group), "
            f"got {tuple(v_scale.shape)}"
        )
    for name, t, like in (("k_min", k_min, k_scale), ("v_min", v_min, v_scale)):
        if t.shape != like.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != its scale's {tuple(like.shape)}")
    for name, t in (
        ("k_codes", k_codes),
        ("k_scale", k_scale),
        ("k_min", k_min),
        ("v_codes", v_codes),
        ("v_scale", v_scale),
        ("v_min", v_min),
    ):
        if t.device != q.device or not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous and on {q.device}")
    return n, H, KVH, P, D, P // ngk, D // ngv


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


def _launch(
    q, k, v, pool, past_pages, dense_k, dense_v, scale, out, kvh, page, kivi, bits=2, tg=1, cg=1
):
    n, H, D = q.shape
    if out is None:
        out = torch.empty_like(q)
    if n == 0 or H == 0:
        return out
    G = H // kvh
    gp = triton.next_power_of_2(G)
    bt = max(1, 64 // gp)
    _baseline_prefill_kernel[(triton.cdiv(n, bt), kvh)](
        q,
        k,
        v,
        *pool,
        past_pages,
        dense_k,
        dense_v,
        out,
        n,
        past_pages.numel(),
        dense_k.shape[1],
        float(scale) * _LOG2E,
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
        KIVI=kivi,
        G=G,
        GP=gp,
        BT=bt,
        PAGE=page,
        HEAD_DIM=D,
        BLOCK_D=block_d(D),
        BITS=bits,
        TG=tg,
        CG=cg,
        DENSE_BLOCK=64,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        DQ_F32=q.dtype == torch.float32,
        num_warps=4 if block_d(D) <= 128 else 8,
        num_stages=2,
    )
    return out


def _attend_ref(q, k, v, past_k, past_v, dense_k, dense_v, scale, out):
    """fp32 attention: past_k/v [KVH, L, D] + dense [KVH, T, D] all visible, then the chunk causally."""
    n, H, D = q.shape
    kvh = k.shape[1]
    keys = torch.cat([past_k, dense_k.float(), k.float().transpose(0, 1)], 1)  # [KVH, L + T + n, D]
    vals = torch.cat([past_v, dense_v.float(), v.float().transpose(0, 1)], 1)
    before = keys.shape[1] - n
    s = torch.einsum("nkgd,kld->kgnl", q.float().view(n, kvh, H // kvh, D), keys) * scale
    vis = torch.ones(n, before + n, dtype=torch.bool, device=q.device).tril(before)
    s = s.masked_fill(~vis, float("-inf"))
    res = torch.einsum("kgnl,kld->nkgd", s.softmax(-1), vals).reshape(n, H, D)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out


def fp8_prefill_attention(
    q, k, v, k_pages, k_scale, v_pages, v_scale, past_pages, dense_k, dense_v, scale, out=None
):
    """Chunk attention over fp8 pages + dense past + itself (causal).  Shapes: module docstring."""
    n, H, KVH, P, D = _check_fp8(
        q, k, v, k_pages, k_scale, v_pages, v_scale, past_pages, dense_k, dense_v, scale, out
    )
    require_runnable("fp8_prefill_attention", _baseline_prefill_kernel, q)
    pool = (k_pages, k_scale, k_scale, v_pages, v_scale, v_scale)
    return _launch(q, k, v, pool, past_pages, dense_k, dense_v, scale, out, KVH, P, kivi=False)


def fp8_prefill_attention_ref(
    q, k, v, k_pages, k_scale, v_pages, v_scale, past_pages, dense_k, dense_v, scale, out=None
):
    """Torch fp32 reference: dequantize the past pages, attend."""
    n, H, KVH, P, D = _check_fp8(
        q, k, v, k_pages, k_scale, v_pages, v_scale, past_pages, dense_k, dense_v, scale, out
    )
    ids = past_pages.long()
    pk = (k_pages[ids].float() * k_scale[ids][:, :, None, None]).transpose(0, 1).reshape(KVH, -1, D)
    pv = (v_pages[ids].float() * v_scale[ids][:, :, None, None]).transpose(0, 1).reshape(KVH, -1, D)
    return _attend_ref(q, k, v, pk, pv, dense_k, dense_v, scale, out)


def kivi_prefill_attention(
    q,
    k,
    v,
    k_codes,
    k_scale,
    k_min,
    v_codes,
    v_scale,
    v_min,
    past_pages,
    dense_k,
    dense_v,
    scale,
    bits,
    out=None,
):
    """Chunk attention over KIVI pages + dense past + itself (causal).  Shapes: module docstring."""
    n, H, KVH, P, D, TG, CG = _check_kivi(
        q,
        k,
        v,
        k_codes,
        k_scale,
        k_min,
        v_codes,
        v_scale,
        v_min,
        past_pages,
        dense_k,
        dense_v,
        scale,
        bits,
        out,
    )
    require_runnable("kivi_prefill_attention", _baseline_prefill_kernel, q)
    pool = (k_codes, k_scale, k_min, v_codes, v_scale, v_min)
    return _launch(
        q,
        k,
        v,
        pool,
        past_pages,
        dense_k,
        dense_v,
        scale,
        out,
        KVH,
        P,
        kivi=True,
        bits=int(bits),
        tg=TG,
        cg=CG,
    )


def kivi_prefill_attention_ref(
    q,
    k,
    v,
    k_codes,
    k_scale,
    k_min,
    v_codes,
    v_scale,
    v_min,
    past_pages,
    dense_k,
    dense_v,
    scale,
    bits,
    out=None,
):
    """Torch fp32 reference: dequantize the past pages (compress/quantize.py), attend."""
    n, H, KVH, P, D, TG, CG = _check_kivi(
        q,
        k,
        v,
        k_codes,
        k_scale,
        k_min,
        v_codes,
        v_scale,
        v_min,
        past_pages,
        dense_k,
        dense_v,
        scale,
        bits,
        out,
    )
    ids = past_pages.long()
    pk = dequant_k(unpack_planar(k_codes[ids], bits), k_scale[ids], k_min[ids])  # [m, KVH, P, D]
    pv = dequant_v(unpack_planar(v_codes[ids], bits), v_scale[ids], v_min[ids])
    return _attend_ref(
        q,
        k,
        v,
        pk.transpose(0, 1).reshape(KVH, -1, D),
        pv.transpose(0, 1).reshape(KVH, -1, D),
        dense_k,
        dense_v,
        scale,
        out,
    )
