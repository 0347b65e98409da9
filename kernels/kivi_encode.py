"""KIVI page encoder: full 16-bit (or fp32) KV pages -> 2/4-bit codes + fp16 scales/mins, written
into a KIVI store (compress/kivi.py) at given page ids.

  * ``kivi_encode_pages``      -- Triton kernel + host wrapper.
  * ``kivi_encode_pages_ref``  -- pure-torch reference with the same signature (KiviCodec's
    original torch encoder: compress/quantize.py + hack_layout.pack_planar).

``kivi_encode_pages(k, v, bits, store, page_ids, clip=0.0, token_group=32, channel_group=32)``
  k, v      [n, KVH, P, D] full pages (float16 / bfloat16 / float32, equal dtypes); the kernel
            reads strided views whose last dim is contiguous.
  store     the codec's dict of contiguous tensors, N pool pages (E = 8 // bits):
            k_codes uint8 [N, KVH, P, D // E], k_scale / k_min fp16 [N, KVH, P // token_group, D],
            v_codes uint8 [N, KVH, P, D // E], v_scale / v_min fp16 [N, KVH, P, D // channel_group].
  page_ids  int32 / int64 [n] on k's device: input page i is written into pool page page_ids[i]
            (distinct and in range: not checked by the kernel). Nothing else of the store changes.

Rules (compress/quantize.py): K per channel over groups of token_group tokens, V per token over
groups of channel_group channels; each group's [min, max] shrunk by `clip` of its width on each
side, scale = range / qmax and min rounded to fp16 as stored, code = clamp(floor((x - min) / scale
+ 0.5), 0, qmax) with the stored values, zero-range groups code 0. Codes are packed planar along
D (hack_layout.py).

Kernel: one program per (input page, kv head) loads the [P, D] K and V tiles once and fuses
min/max, the range clip, fp16 rounding of scale/min, rounding, clamp and planar packing (the
quantize / clip helpers are HACK's, kernels/hack_encode_kernels.py). Its tiles need page_size and
head_dim powers of two (the wrapper raises ValueError otherwise; KiviCodec then takes the
reference). On GPU the fp32 division may differ from the reference in the last ulp, so a rare
code can differ by one at an exact rounding tie.
"""

import torch
import triton
import triton.language as tl

from zipserve.compress import quantize as qz
from zipserve.kernels.arg_checks import (
    check_kernel_layout,
    check_kv_pages,
    check_page_ids,
    check_store,
    is_pow2,
    kernel_rows,
    page_strides,
    pages_read,
    put_rows,
    rows_written,
)
from zipserve.kernels.hack_encode_kernels import _clip, _quantize
from zipserve.kernels.hack_layout import check_bits, pack_planar
from zipserve.kernels.paged_decode_attention import require_runnable

__all__ = ["kivi_encode_pages", "kivi_encode_pages_ref"]

_STORE = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")


@triton.jit
def _encode_page(
    k_ptr,
    v_ptr,
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,
    i,
    row,
    h,
    stride_kn,
    stride_kh,
    stride_kt,
    stride_vn,
    stride_vh,
    stride_vt,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    TG: tl.constexpr,
    CG: tl.constexpr,
    CLIP: tl.constexpr,
):
    """Input page i (head h) of k / v -> pool row `row` of the store."""
    E: tl.constexpr = 8 // BITS
    DE: tl.constexpr = HEAD_DIM // E
    NT: tl.constexpr = PAGE // TG  # K groups per channel
    NG: tl.constexpr = HEAD_DIM // CG  # V groups per token
    QMAX: tl.constexpr = (1 << BITS) - 1
    offs_t = tl.arange(0, PAGE)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, DE)
    shifts = (tl.arange(0, E) * BITS)[None, :, None]  # [1, E, 1] bit offset of plane s
    codes_ptr = row * (PAGE * DE) + offs_t[:, None] * DE + offs_c[None, :]  # [P, DE]

    # ---- K: per channel over groups of TG tokens.
    k = tl.load(
        k_ptr + i * stride_kn + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :]
    ).to(tl.float32)  # [P, D]
    k3 = tl.reshape(k, (NT, TG, HEAD_DIM))
    klo, khi = _clip(tl.min(k3, axis=1)[:, None, :], tl.max(k3, axis=1)[:, None, :], CLIP)
    kq3, ksc, kmn = _quantize(k3, klo, khi, QMAX)  # codes [NT, TG, D], ranges [NT, 1, D]
    kq = tl.reshape(kq3, (PAGE, HEAD_DIM))
    kpack = tl.sum(tl.reshape(kq, (PAGE, E, DE)) << shifts, axis=1)  # [P, DE] planar bytes
    tl.store(kc_ptr + codes_ptr, kpack.to(tl.uint8))
    kside = row * (NT * HEAD_DIM) + tl.arange(0, NT)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ks_ptr + kside, tl.reshape(ksc, (NT, HEAD_DIM)).to(tl.float16))  # [NT, D]
    tl.store(km_ptr + kside, tl.reshape(kmn, (NT, HEAD_DIM)).to(tl.float16))

    # ---- V: per token over groups of CG channels.
    v = tl.load(
        v_ptr + i * stride_vn + h * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :]
    ).to(tl.float32)  # [P, D]
    v3 = tl.reshape(v, (PAGE, NG, CG))
    vlo, vhi = _clip(tl.min(v3, axis=2)[:, :, None], tl.max(v3, axis=2)[:, :, None], CLIP)
    vq3, vsc, vmn = _quantize(v3, vlo, vhi, QMAX)  # codes [P, NG, CG], ranges [P, NG, 1]
    vq = tl.reshape(vq3, (PAGE, HEAD_DIM))
    vpack = tl.sum(tl.reshape(vq, (PAGE, E, DE)) << shifts, axis=1)  # [P, DE]
    tl.store(vc_ptr + codes_ptr, vpack.to(tl.uint8))
    vside = row * (PAGE * NG) + offs_t[:, None] * NG + tl.arange(0, NG)[None, :]  # [P, NG]
    tl.store(vs_ptr + vside, tl.reshape(vsc, (PAGE, NG)).to(tl.float16))
    tl.store(vm_ptr + vside, tl.reshape(vmn, (PAGE, NG)).to(tl.float16))


def store_shapes(n_pool, kvh, page, d, bits, token_group, channel_group):
    """name -> (shape, dtype) of a KIVI store of n_pool pages (module doc): the one definition
    of its layout, KiviCodec.new_store allocates it."""
    de = d // (8 // bits)
    codes = ((n_pool, kvh, page, de), torch.uint8)
    k_side = ((n_pool, kvh, page // token_group, d), torch.float16)
    v_side = ((n_pool, kvh, page, d // channel_group), torch.float16)
    return {
        "k_codes": codes,
        "k_scale": k_side,
        "k_min": k_side,
        "v_codes": codes,
        "v_scale": v_side,
        "v_min": v_side,
    }


@triton.jit
def _kivi_encode_kernel(
    k_ptr,
    v_ptr,
    ids_ptr,  # k/v [n, KVH, P, D] (strided, last dim contiguous), ids [m]
    src_ptr,  # [m] int32: page i is row src[i] of k / v
    skip,  # page id whose programs write nothing (-1: none)
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,  # contiguous store tensors
    stride_kn,
    stride_kh,
    stride_kt,
    stride_vn,
    stride_vh,
    stride_vt,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    TG: tl.constexpr,
    CG: tl.constexpr,
    CLIP: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    page = tl.load(ids_ptr + i).to(tl.int64)
    if page != skip:  # rows sealing into the skipped (scratch) page write nothing
        _encode_page(
            k_ptr,
            v_ptr,
            kc_ptr,
            ks_ptr,
            km_ptr,
            vc_ptr,
            vs_ptr,
            vm_ptr,
            tl.load(src_ptr + i).to(tl.int64),
            page * tl.num_programs(1) + h,
            h,
            stride_kn,
            stride_kh,
            stride_kt,
            stride_vn,
            stride_vh,
            stride_vt,
            PAGE,
            HEAD_DIM,
            BITS,
            TG,
            CG,
            CLIP,
        )


def _check_args(
    k, v, bits, store, page_ids, clip, token_group, channel_group, src_rows=None
) -> float:
    """Validate the arguments both paths share; returns clip as a float. ValueError names the
    argument."""
    bits = check_bits(bits)
    clip = qz.check_clip(clip)
    check_kv_pages(k, v)
    n, kvh, page, d = k.shape
    n = pages_read(k, src_rows)
    for name, g, extent, what in (
        ("token_group", token_group, page, "page_size"),
        ("channel_group", channel_group, d, "head_dim"),
    ):
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
            raise ValueError(f"{name} must be a positive int, got {g!r}")
        if extent % g:
            raise ValueError(f"{what}: k's {what} {extent} is not a multiple of {name} {g}")
    if d % (8 // bits):
        raise ValueError(f"head_dim: {d} is not a multiple of {8 // bits} (bits={bits})")
    check_page_ids(page_ids, n, k.device)
    if not isinstance(store, dict):
        raise ValueError(f"store must be a dict of tensors, got {type(store).__name__}")
    kc = store.get("k_codes")
    if not isinstance(kc, torch.Tensor) or kc.dim() != 4:
        raise ValueError(f"store['k_codes'] must be a [N, KVH, P, D // E] tensor, got {kc!r:.80}")
    want = store_shapes(kc.shape[0], kvh, page, d, bits, token_group, channel_group)
    check_store(store, want, k.device, note=f" (bits={bits})")
    return clip


def kivi_encode_pages(
    k,
    v,
    bits,
    store,
    page_ids,
    clip=0.0,
    token_group=32,
    channel_group=32,
    src_rows=None,
    skip_page=None,
) -> None:
    """Quantize full pages k, v [n, KVH, P, D] into store rows page_ids (module doc), in one
    Triton launch. Needs power-of-two page_size and head_dim (ValueError otherwise: use
    kivi_encode_pages_ref), k/v with a contiguous last dim and contiguous store tensors.
    src_rows (int32 [m]): page i is row src_rows[i] of k / v, read in place; skip_page: a page id
    whose programs write nothing (a decode step's rows that fill no page: CUDA-graph safe)."""
    clip = _check_args(k, v, bits, store, page_ids, clip, token_group, channel_group, src_rows)
    _, kvh, page, d = k.shape
    n = page_ids.shape[0]
    if not is_pow2(page) or not is_pow2(d):
        raise ValueError(
            f"page_size / head_dim: the Triton encoder needs powers of two, got page_size "
            f"{page}, head_dim {d} (kivi_encode_pages_ref takes any)"
        )
    check_kernel_layout(k, v, store, _STORE)
    require_runnable("kivi_encode_pages", _kivi_encode_kernel, k)
    if n == 0 or kvh == 0:
        return
    src, skip = kernel_rows(src_rows, skip_page, n, k.device)
    _kivi_encode_kernel[(n, kvh)](
        k,
        v,
        page_ids,
        src,
        skip,
        *(store[name] for name in _STORE),  # the kernel's store arguments, in _STORE's order
        *page_strides(k, v),
        PAGE=page,
        HEAD_DIM=d,
        BITS=bits,
        TG=token_group,
        CG=channel_group,
        CLIP=clip,
        num_warps=4 if page * d < 8192 else 8,
    )


def kivi_encode_pages_ref(
    k,
    v,
    bits,
    store,
    page_ids,
    clip=0.0,
    token_group=32,
    channel_group=32,
    src_rows=None,
    skip_page=None,
) -> None:
    """Pure-torch reference of kivi_encode_pages (same signature; any page_size / head_dim the
    groups divide, any strides)."""
    clip = _check_args(k, v, bits, store, page_ids, clip, token_group, channel_group, src_rows)
    k, v, page_ids, keep = rows_written(k, v, page_ids, src_rows, skip_page)
    kc, ks, km = qz.k_per_channel(k, bits, token_group, clip)  # [n, KVH, P, D], [n, KVH, G, D]
    vc, vs, vm = qz.v_per_token(v, bits, channel_group, clip)  # [n, KVH, P, D], [n, KVH, P, G]
    put_rows(store["k_codes"], page_ids, pack_planar(kc, bits), keep)
    put_rows(store["v_codes"], page_ids, pack_planar(vc, bits), keep)
    for name, t in (("k_scale", ks), ("k_min", km), ("v_scale", vs), ("v_min", vm)):
        put_rows(store[name], page_ids, t, keep)
