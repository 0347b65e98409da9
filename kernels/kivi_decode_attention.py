"""Baseline: decode attention on KIVI-style 2/4-bit KV pages, dequantizing inside the kernel.

  * ``kivi_decode_attention``      -- Triton kernel + host wrapper (GQA, flash-decoding splits, CUDA-graph safe).
  * ``kivi_decode_attention_ref``  -- pure-torch fp32 reference with the same signature (NOT graph safe).
  * ``kivi_bytes_per_token``       -- exact stored bytes per token per kv head (K + V, amortized over a page).

Layout of one layer (P = page_size, D = head_dim, b = bits, E = 8 // b, DE = D // E, TG = K token group,
CG = V channel group; TG and CG are read off the scale shapes, 32 / 32 by default):
  k_codes        uint8   [N, KVH, P, DE]       K codes, planar-packed (hack_layout.pack_planar: byte j of a
                                               token row holds channels j + s * DE at bit offset s * b)
  k_scale, k_min float16 [N, KVH, P // TG, D]  K quantized per channel over groups of TG tokens
  v_codes        uint8   [N, KVH, P, DE]       V codes, planar-packed
  v_scale, v_min float16 [N, KVH, P, D // CG]  V quantized per token over groups of CG channels
x ~= code * scale + min (compress/quantize.py).  Pool tensors must be contiguous.

Call inputs:
  q          [B, H, D]            float16 / bfloat16 / float32; query head h uses kv head h // (H // KVH)
  page_table [B, max_pages] int32 quantized page i of sequence b is pool page page_table[b, i]
  n_pages    [B] int32            number of full quantized pages of sequence b: all P * n_pages[b] tokens
                                  are attended (no sink masking)
  dense_k/v  [B, KVH, T, D]       q's dtype: the 16-bit tail (open page, < P tokens in practice)
  dense_lens [B] int32            valid dense tokens of sequence b (<= T)
n_pages[b] == dense_lens[b] == 0 is a padding row: the output is zeros.

The Triton kernel (and how it reads the pages): kivi_decode_kernel.py.
"""

import torch
import triton

from zipserve.compress.quantize import dequant_k, dequant_v
from zipserve.kernels.arg_checks import FLOAT_DTYPES, is_pow2
from zipserve.kernels.hack_layout import check_bits, unpack_planar
from zipserve.kernels.head_dim import block_d, head_dim_error, head_dim_ok
from zipserve.kernels.kivi_decode_kernel import _kivi_decode_kernel
from zipserve.kernels.paged_decode_attention import (
    merge_splits,
    require_runnable,
    split_buffers,
)

__all__ = ["kivi_decode_attention", "kivi_decode_attention_ref", "kivi_bytes_per_token"]

_LOG2E = 1.4426950408889634


def _check_call_args(
    q,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    num_splits,
    out,
    kvh,
    pool_name,
    pool_device,
):
    """Checks shared by the baseline kernels (everything except the page pool's own layout).

    Returns (B, H, D).  Raises ValueError naming the offending argument.
    """
    if q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"q must be [B, num_heads, head_dim] of {FLOAT_DTYPES}, got {q.dtype} {tuple(q.shape)}"
        )
    B, H, D = q.shape
    if not head_dim_ok(D):
        raise ValueError(head_dim_error(D, "q head_dim"))
    if kvh == 0 or H % kvh:
        raise ValueError(f"q num_heads {H} must be a multiple of {pool_name} num_kv_heads {kvh}")
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
    for name, t in (("dense_k", dense_k), ("dense_v", dense_v)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != kvh or t.shape[3] != D:
            raise ValueError(f"{name} must be [B={B}, KVH={kvh}, T, D={D}], got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    if dense_v.shape != dense_k.shape:
        raise ValueError(
            f"dense_v shape {tuple(dense_v.shape)} != dense_k shape {tuple(dense_k.shape)}"
        )
    if pool_device != q.device:
        raise ValueError(f"{pool_name} is on {pool_device}, q is on {q.device}")
    for name, t in (
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
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), "
                f"got ({tuple(out.shape)}, {out.dtype}, {out.device})"
            )
        if out.numel() > 0 and out.stride(-1) != 1:
            raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    return B, H, D


def _check_inputs(
    q,
    k_codes,
    k_scale,
    k_min,
    v_codes,
    v_scale,
    v_min,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    bits,
    num_splits,
    out,
):
    """Validate arguments; returns (B, H, KVH, P, D, TG, CG).  Raises ValueError naming the argument."""
    bits = check_bits(bits)
    e = 8 // bits
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 4:
            raise ValueError(f"{name} must be uint8 [num_pages, KVH, page_size, head_dim // {e}]")
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a tensor, got {type(q).__name__}")
    N, KVH, P, DE = k_codes.shape
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
        "k_codes",
        k_codes.device,
    )
    if DE * e != D:
        raise ValueError(
            f"k_codes last dim {DE} != head_dim / (8 / bits) = {D} / {e} (bits={bits})"
        )
    if not (is_pow2(P) and P >= 16):
        raise ValueError(f"k_codes page_size must be a power of two >= 16, got {P}")
    if tuple(v_codes.shape) != (N, KVH, P, DE):
        raise ValueError(f"v_codes shape {tuple(v_codes.shape)} != k_codes shape {(N, KVH, P, DE)}")
    for name, t in (("k_scale", k_scale), ("k_min", k_min), ("v_scale", v_scale), ("v_min", v_min)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float16 or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d float16 tensor")
    ngk, ngv = k_scale.shape[2], v_scale.shape[3]
    if ngk == 0 or P % ngk or not is_pow2(P // ngk) or tuple(k_scale.shape) != (N, KVH, ngk, D):
        raise ValueError(
            f"k_scale must be [N={N}, KVH={KVH}, page_size / token_group, D={D}] with a power-of-two "
            f"token_group dividing page_size={P}, got {tuple(k_scale.shape)}"
        )
    if ngv == 0 or D % ngv or not is_pow2(D // ngv) or tuple(v_scale.shape) != (N, KVH, P, ngv):
        raise ValueError(
            f"v_scale must be [N={N}, KVH={KVH}, P={P}, D / channel_group] with a power-of-two "
            f"channel_group dividing head_dim={D}, got {tuple(v_scale.shape)}"
        )
    if k_min.shape != k_scale.shape:
        raise ValueError(
            f"k_min shape {tuple(k_min.shape)} != k_scale shape {tuple(k_scale.shape)}"
        )
    if v_min.shape != v_scale.shape:
        raise ValueError(
            f"v_min shape {tuple(v_min.shape)} != v_scale shape {tuple(v_scale.shape)}"
        )
    for name, t in (
        ("k_codes", k_codes),
        ("k_scale", k_scale),
        ("k_min", k_min),
        ("v_codes", v_codes),
        ("v_scale", v_scale),
        ("v_min", v_min),
    ):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return B, H, KVH, P, D, P // ngk, D // ngv


def kivi_bytes_per_token(
    head_dim: int, bits: int, page_size: int = 64, token_group: int = 32, channel_group: int = 32
) -> float:
    """Exact stored bytes per token per kv head, K and V together, amortized over a page.

    codes: 2 * D * b / 8; K scale + min (fp16, per channel per TG tokens): 2 * 2 * D / TG;
    V scale + min (fp16, per token per CG channels): 2 * 2 * D / CG.  D=128, TG=CG=32: 96 B at 2 bits,
    160 B at 4 bits (bf16 KV: 512 B).  page_size only has to be a multiple of token_group.
    """
    check_bits(bits)
    if head_dim % channel_group or head_dim % (8 // bits):
        raise ValueError(
            f"head_dim {head_dim} must be a multiple of channel_group {channel_group} and 8 / bits"
        )
    if page_size % token_group:
        raise ValueError(f"page_size {page_size} is not a multiple of token_group {token_group}")
    codes = 2 * head_dim * bits / 8
    k_side = 2 * 2 * head_dim / token_group
    v_side = 2 * 2 * head_dim / channel_group
    return codes + k_side + v_side


def _launch_config(head_dim: int, page_size: int):
    """Fixed heuristic (no autotune): (NP pages per step, num_warps, num_stages).

    The dequantized K and V [BLOCK_N, D] tiles are formed in registers, so a step holds ~8K elements:
    128 tokens at D <= 64, 64 tokens (one default page) above (D: the padded tile width).  The code /
    scale loads feed ALU ops, not dots, so Triton's pipeliner does not stage them through shared
    memory; 2 stages.
    """
    bd = block_d(head_dim)
    np_ = max(1, (128 if bd <= 64 else 64) // page_size)
    num_warps = 8 if bd >= 256 else 4
    return np_, num_warps, 2


def kivi_decode_attention(
    q,
    k_codes,
    k_scale,
    k_min,
    v_codes,
    v_scale,
    v_min,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    bits,
    num_splits=1,
    out=None,
):
    """Decode attention on KIVI pages + a dense tail (module docstring).  Returns out [B, H, D]."""
    B, H, KVH, P, D, TG, CG = _check_inputs(
        q,
        k_codes,
        k_scale,
        k_min,
        v_codes,
        v_scale,
        v_min,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        bits,
        num_splits,
        out,
    )
    require_runnable("kivi_decode_attention", _kivi_decode_kernel, q)
    if out is None:
        out = torch.empty_like(q)
    if B == 0 or H == 0:
        return out
    G = H // KVH
    np_, num_warps, num_stages = _launch_config(D, P)
    part, lse = split_buffers(q, out, num_splits)
    _kivi_decode_kernel[(B, KVH, num_splits)](
        q,
        k_codes,
        k_scale,
        k_min,
        v_codes,
        v_scale,
        v_min,
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
        BITS=int(bits),
        TG=TG,
        CG=CG,
        NUM_SPLITS=num_splits,
        DENSE_BLOCK=64,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        DQ_F32=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        merge_splits(part, lse, out)
    return out


def _attend_rows_ref(q, rows, scale, out):
    """Shared reference core.  rows: per batch row, None (padding) or (k, v) fp32 [KVH, n, D]."""
    B, H, D = q.shape
    res = torch.zeros((B, H, D), dtype=torch.float32, device=q.device)
    for b, kv in enumerate(rows):
        if kv is None:
            continue
        k, v = kv
        kvh = k.shape[0]
        qb = q[b].float().view(kvh, H // kvh, D)
        p = (torch.einsum("kgd,knd->kgn", qb, k) * scale).softmax(dim=-1)
        res[b] = torch.einsum("kgn,knd->kgd", p, v).reshape(H, D)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out


def kivi_decode_attention_ref(
    q,
    k_codes,
    k_scale,
    k_min,
    v_codes,
    v_scale,
    v_min,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    bits,
    num_splits=1,
    out=None,
):
    """Pure-torch fp32 reference: gathers the row's pages, dequantizes them (compress/quantize.py), appends
    the dense tail and runs softmax attention.  Loops over rows with host syncs on the lengths: not
    CUDA-graph capturable.  Ignores num_splits."""
    B, H, KVH, P, D, TG, CG = _check_inputs(
        q,
        k_codes,
        k_scale,
        k_min,
        v_codes,
        v_scale,
        v_min,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        bits,
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
        k = dequant_k(unpack_planar(k_codes[ids], bits), k_scale[ids], k_min[ids])  # [n, KVH, P, D]
        v = dequant_v(unpack_planar(v_codes[ids], bits), v_scale[ids], v_min[ids])
        k = torch.cat(
            [k.transpose(0, 1).reshape(KVH, npg * P, D), dense_k[b, :, :dl].float()], dim=1
        )
        v = torch.cat(
            [v.transpose(0, 1).reshape(KVH, npg * P, D), dense_v[b, :, :dl].float()], dim=1
        )
        rows.append((k, v))
    return _attend_rows_ref(q, rows, scale, out)
