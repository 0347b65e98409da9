"""Decode attention of the `lowrank` codec (ZeroC-style): pages in the reduced dimension.

  * ``lowrank_decode_attention``      -- Triton kernel + host wrapper (GQA, flash-decoding splits).
  * ``lowrank_decode_attention_ref``  -- pure-torch fp32 reference with the same signature.

What a query sees (compress/lowrank.py): pages hold k @ k_enc and v @ v_enc; the 16-bit dense tail
(open page, no sinks for plain lowrank) holds K at full dimension (after RoPE, exact scores for the
most recent tokens) and V at full dimension in V's completed basis, v @ [v_enc | C] (exact: the
first RV coordinates are the pages' v @ v_enc, the other DV - RV a complement only the tail has).
Scores against pages use q_red = q @ k_dec (q projected after RoPE by the caller), scores against
the tail use q itself; pages add to the first RV output columns, the tail to all DV, so the output
o [B, H, DV] is in that basis and W_o is folded with its inverse at load time
(compress/lowrank_fold.py): nothing is lifted back per step.

Layout of one layer (P = page_size):
  q        [B, H, D]               after RoPE (last dim contiguous)
  q_red    [B, H, RK]              q @ k_dec per kv head group (a view of a wider buffer is fine)
  k_pages  float16 [N, KVH, P, RK] contiguous, exactly RK columns (no padding stored)
  v_pages  float16 [N, KVH, P, RV] contiguous
  dense_k  [B, KVH, T, D]          q's dtype, full dimension
  dense_v  [B, KVH, T, DV]         q's dtype, DV >= RV (the engine: DV = D, V's completed basis)
  out      [B, H, DV]              q's dtype
RK, RV, DV and D need not be powers of two (any ranks; D any even size in [8, 256]): the
kernel loads tiles of the next power of two with masked columns, which reads and stores nothing extra.  A row attends to all
n_pages[b] * P page tokens and dense_lens[b] tail tokens; n_pages[b] == dense_lens[b] == 0 is a
padding row (zeros).

Kernel: grid (B, KVH, num_splits); one program owns the G query heads of a kv head as [G_PAD >= 16,
D] and [G_PAD, RK_PAD] tiles and streams its split's pages NP at a time into a [G_PAD, DV_PAD]
accumulator (page values zero past RV).  With a 16-bit q the dots
run in float16 (the pages' own type; q and the tail are converted, exact for values in fp16 range),
with an fp32 q in fp32; online softmax in the log2 domain with fp32 accumulation; the last split
also attends the dense tail; splits are merged by paged_decode_attention's merge kernel.
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES
from zipserve.kernels.decode_steps import _dense_tail, _online_softmax_step, _split_pages
from zipserve.kernels.head_dim import block_d, head_dim_error, head_dim_ok
from zipserve.kernels.paged_decode_attention import merge_splits, require_runnable

__all__ = ["lowrank_decode_attention", "lowrank_decode_attention_ref", "lowrank_bytes_per_token"]

_LOG2E = 1.4426950408889634


@triton.jit
def _lowrank_decode_kernel(
    q_ptr,
    qr_ptr,
    k_ptr,
    v_ptr,  # q [B,H,D], q_red [B,H,RK]; pages f16 [N,KVH,P,RK] / [N,KVH,P,RV]
    pt_ptr,
    np_ptr,
    dk_ptr,
    dv_ptr,
    dl_ptr,  # page_table [B,MP], n_pages [B], dense [B,KVH,T,D] / [B,KVH,T,DV], lens [B]
    out_ptr,
    part_ptr,
    lse_ptr,  # out [B,H,DV]; part f32 [B,H,S,DV_PAD]; lse f32 [B,H,S] (log2)
    qk_scale,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_qrb,
    stride_qrh,
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
    RK: tl.constexpr,
    RV: tl.constexpr,
    DV: tl.constexpr,
    RK_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    NP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DENSE_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    F16: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    KVH = tl.num_programs(1)
    BLOCK_N: tl.constexpr = NP * PAGE

    offs_g = tl.arange(0, G_PAD)
    offs_k = tl.arange(0, RK_PAD)
    offs_v = tl.arange(0, DV_PAD)
    ck = offs_k < RK
    cv = offs_v < RV  # the pages' value columns
    cdv = offs_v < DV  # the tail's (and the output's)
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    d_ok = offs_d < HEAD_DIM
    heads = kvh * G + offs_g
    mg = (offs_g < G)[:, None]
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mg & d_ok[None, :],
        other=0.0,
    )  # [G_PAD, BD]; padded rows / channels are zeros
    qr = tl.load(
        qr_ptr + b * stride_qrb + heads[:, None] * stride_qrh + offs_k[None, :],
        mask=mg & ck[None, :],
        other=0.0,
    )  # [G_PAD, RK_PAD]
    if F16:
        q = q.to(tl.float16)
        qr = qr.to(tl.float16)
    cdt = q.dtype

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)

    # ---- dense 16-bit tail (K and V full, V in its completed basis): last split only.
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
        offs_v,
        cdv,
        m_i,
        l_i,
        acc,
        qk_scale,
        DENSE_BLOCK,
        DOT_PREC,
    )

    # ---- reduced pages: this split's page range [lo, hi), whole steps of NP pages.
    lo, hi = _split_pages(tl.load(np_ptr + b), split, NUM_SPLITS, NP)
    pt_row = pt_ptr + b * stride_ptb
    offs_n = tl.arange(0, BLOCK_N)
    slot = offs_n % PAGE
    for blk in range(lo, hi, NP):
        pg = blk + offs_n // PAGE  # [N] logical page of each token
        ok = pg < hi
        tok = (tl.load(pt_row + pg, mask=ok, other=0).to(tl.int64) * KVH + kvh) * PAGE + slot  # [N]
        k = tl.load(
            k_ptr + tok[:, None] * RK + offs_k[None, :], mask=ok[:, None] & ck[None, :], other=0.0
        ).to(cdt)  # [N, RK_PAD]
        v = tl.load(
            v_ptr + tok[:, None] * RV + offs_v[None, :], mask=ok[:, None] & cv[None, :], other=0.0
        ).to(cdt)  # [N, DV_PAD], zeros past RV
        m_i, l_i, acc = _online_softmax_step(qr, k, v, ok, m_i, l_i, acc, qk_scale, DOT_PREC)

    # ---- store: normalized output (one split) or the split's partial + log2-sum-exp.
    mask_g = offs_g < G
    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]  # [G_PAD, DV_PAD]; zeros for an empty range
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_v[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=mask_g[:, None] & cdv[None, :],
        )
    else:
        row = (b * KVH * G + heads) * NUM_SPLITS + split  # [G_PAD] row in part / lse
        tl.store(part_ptr + row[:, None] * DV_PAD + offs_v[None, :], o, mask=mask_g[:, None])
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=mask_g)


def _check_inputs(
    q,
    q_red,
    k_pages,
    v_pages,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    num_splits,
    out,
):
    """Validate arguments; returns (B, H, KVH, P, D, RK, RV, DV).  Raises ValueError naming the
    argument."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"q must be [B, H, D] of {FLOAT_DTYPES}, got {getattr(q, 'dtype', type(q).__name__)} "
            f"{tuple(getattr(q, 'shape', ()))}"
        )
    B, H, D = q.shape
    if not head_dim_ok(D):
        raise ValueError(head_dim_error(D, "q head_dim"))
    if (
        not isinstance(q_red, torch.Tensor)
        or q_red.dim() != 3
        or q_red.shape[:2] != (B, H)
        or q_red.dtype != q.dtype
    ):
        raise ValueError(
            f"q_red must be {q.dtype} [B={B}, H={H}, RK], got "
            f"{getattr(q_red, 'dtype', None)} {tuple(getattr(q_red, 'shape', ()))}"
        )
    RK = q_red.shape[2]
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float16 or t.dim() != 4:
            raise ValueError(
                f"{name} must be float16 [N, KVH, P, R], got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    N, KVH, P, rk = k_pages.shape
    RV = v_pages.shape[3]
    if rk != RK:
        raise ValueError(f"k_pages rank {rk} != q_red's last dim {RK}")
    if v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(
            f"v_pages shape {tuple(v_pages.shape)} does not match k_pages {tuple(k_pages.shape)}"
        )
    if not (P >= 16 and P & (P - 1) == 0):
        raise ValueError(f"k_pages page_size must be a power of two >= 16, got {P}")
    if not (1 <= RK <= 256 and 1 <= RV <= 256):
        raise ValueError(f"ranks must be in [1, 256], got RK={RK}, RV={RV}")
    if KVH == 0 or H % KVH:
        raise ValueError(f"q num_heads {H} must be a multiple of k_pages num_kv_heads {KVH}")
    if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.shape[0] != B:
        raise ValueError(
            f"page_table must be int32 [B={B}, max_pages], got {page_table.dtype} "
            f"{tuple(page_table.shape)}"
        )
    for name, t in (("n_pages", n_pages), ("dense_lens", dense_lens)):
        if t.dtype != torch.int32 or tuple(t.shape) != (B,) or not t.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous int32 [B={B}], got {t.dtype} {tuple(t.shape)}"
            )
    for name, t, r in (("dense_k", dense_k, D), ("dense_v", dense_v, RV)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != KVH or t.shape[3] < r:
            raise ValueError(f"{name} must be [B={B}, KVH={KVH}, T, >={r}], got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    DV = dense_v.shape[3]
    if DV > 256:
        raise ValueError(f"dense_v width must be <= 256, got {DV}")
    if dense_k.shape[2] != dense_v.shape[2]:
        raise ValueError(
            f"dense_k and dense_v hold {dense_k.shape[2]} and {dense_v.shape[2]} tokens"
        )
    for name, t in (
        ("q_red", q_red),
        ("k_pages", k_pages),
        ("v_pages", v_pages),
        ("page_table", page_table),
        ("n_pages", n_pages),
        ("dense_k", dense_k),
        ("dense_v", dense_v),
        ("dense_lens", dense_lens),
    ):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    for name, t in (
        ("q", q),
        ("q_red", q_red),
        ("page_table", page_table),
        ("dense_k", dense_k),
        ("dense_v", dense_v),
    ):
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a python float, got {type(scale).__name__}")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    if out is not None and (
        tuple(out.shape) != (B, H, DV)
        or out.dtype != q.dtype
        or out.device != q.device
        or out.stride(-1) != 1
    ):
        raise ValueError(
            f"out must be {q.dtype} [B={B}, H={H}, DV={DV}] on {q.device}, got "
            f"{out.dtype} {tuple(out.shape)}"
        )
    return B, H, KVH, P, D, RK, RV, DV


def lowrank_bytes_per_token(rk: int, rv: int) -> float:
    """Stored bytes per token per kv head of a full page, K and V together: float16 values of
    exactly the ranks (no padding is stored).  rk = rv = 64: 256 B (bf16 at D=128: 512 B)."""
    return 2.0 * (rk + rv)


def lowrank_decode_attention(
    q,
    q_red,
    k_pages,
    v_pages,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    num_splits=1,
    out=None,
):
    """Decode attention on reduced pages + a dense tail (module docstring).  Returns out [B, H, DV]."""
    B, H, KVH, P, D, RK, RV, DV = _check_inputs(
        q,
        q_red,
        k_pages,
        v_pages,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        num_splits,
        out,
    )
    require_runnable("lowrank_decode_attention", _lowrank_decode_kernel, q)
    if out is None:
        out = torch.empty((B, H, DV), dtype=q.dtype, device=q.device)
    if B == 0 or H == 0:
        return out
    G = H // KVH
    rk_pad, dv_pad = max(16, triton.next_power_of_2(RK)), max(16, triton.next_power_of_2(DV))
    np_ = max(1, 128 // P)
    if num_splits > 1:
        part = torch.empty((B, H, num_splits, dv_pad), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused by the kernel
    _lowrank_decode_kernel[(B, KVH, num_splits)](
        q,
        q_red,
        k_pages,
        v_pages,
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
        q_red.stride(0),
        q_red.stride(1),
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
        RK=RK,
        RV=RV,
        DV=DV,
        RK_PAD=rk_pad,
        DV_PAD=dv_pad,
        PAGE=P,
        NP=np_,
        NUM_SPLITS=num_splits,
        DENSE_BLOCK=64,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        F16=q.dtype != torch.float32,
        num_warps=4,
        num_stages=2 if q.dtype == torch.float32 else 3,
    )
    if num_splits > 1:  # merge at the padded width, then keep the DV real columns
        merged = torch.empty((B, H, dv_pad), dtype=q.dtype, device=q.device)
        merge_splits(part, lse, merged)
        out.copy_(merged[..., :DV])
    return out


def lowrank_decode_attention_ref(
    q,
    q_red,
    k_pages,
    v_pages,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    num_splits=1,
    out=None,
):
    """fp32 torch reference: per row, scores q_red . pages and q . tail, one softmax over both, applied
    to the pages' values (zero padded from RV to DV) and the tail's.  Host syncs on the lengths;
    ignores num_splits."""
    B, H, KVH, P, D, RK, RV, DV = _check_inputs(
        q,
        q_red,
        k_pages,
        v_pages,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        num_splits,
        out,
    )
    res = torch.zeros((B, H, DV), dtype=torch.float32, device=q.device)
    g = H // KVH
    for b, (npg, dl) in enumerate(zip(n_pages.tolist(), dense_lens.tolist())):
        npg, dl = max(npg, 0), max(dl, 0)
        if npg == 0 and dl == 0:
            continue
        ids = page_table[b, :npg].long()
        kp = k_pages[ids].float().transpose(0, 1).reshape(KVH, npg * P, RK)  # [KVH, n_p, RK]
        vp = v_pages[ids].float().transpose(0, 1).reshape(KVH, npg * P, RV)
        v = torch.cat(
            [torch.nn.functional.pad(vp, (0, DV - RV)), dense_v[b, :, :dl].float()], 1
        )  # [KVH, n_p + dl, DV]
        s = torch.cat(
            [
                torch.einsum("kgr,knr->kgn", q_red[b].float().view(KVH, g, RK), kp),
                torch.einsum(
                    "kgd,ktd->kgt", q[b].float().view(KVH, g, D), dense_k[b, :, :dl].float()
                ),
            ],
            -1,
        )  # [KVH, G, n_p + dl]
        p = (s * scale).softmax(-1)
        res[b] = torch.einsum("kgn,knr->kgr", p, v).reshape(H, DV)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out
