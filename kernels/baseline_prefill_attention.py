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

The Triton kernel: baseline_prefill_kernel.py.
"""

import torch
import triton

from zipserve.compress.quantize import dequant_k, dequant_v
from zipserve.kernels.arg_checks import FLOAT_DTYPES, is_pow2
from zipserve.kernels.baseline_prefill_kernel import _baseline_prefill_kernel
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
