"""HACK page encoder: full 16-bit (or fp32) KV pages -> 2/4-bit codes + scales/mins + code sums.

  * ``hack_encode_pages``      -- Triton kernel + host wrapper.
  * ``hack_encode_pages_ref``  -- pure-torch reference with the same signature and the same arithmetic.
  * ``hack_dequantize_ref``    -- torch dequantizer (tests / debugging only; decode never dequantizes).

``hack_encode_pages(k, v, bits, group_v=64, out=None, page_ids=None) -> HackPages``
  k, v: [n, KVH, P, D] full pages (P = page_size tokens, float16 / bfloat16 / float32, last dim contiguous).
  out=None: a new pool of n pages is returned (page i <- input page i).
  out=<HackPages pool>: input page i is written into pool page ``page_ids[i]`` (int32/int64 [n], on the
  device; ids must be distinct and in range -- not checked by the kernel), and ``out`` is returned.
  This is how the engine seals an open page (or a whole prefilled prompt) straight into the pool.

Layout and rounding rules: see hack_layout.py.  Kernel: one program per (input page, kv head) loads the
[P, D] K and V tiles once, and fuses min/max, the range clip, float16 rounding of scale/min,
round-to-nearest (ties up: floor(x + 0.5)), clamp, planar packing and the code sums.  On GPU the
fp32 division may differ from the reference in the last ulp, so a rare code can differ by one at an
exact rounding tie.

Range clip (``clip``, issue 19): each quantization group (K: one channel over the page's P tokens; V:
one token's GV channels), *in the stored basis* (after the fused rotation), is quantized over its
[min, max] shrunk by ``clip`` of its width on each side: [lo + c r, hi - c r], r = hi - lo (scale =
(1 - 2c) r / qmax, min = lo + c r, both fp16-rounded as stored); values outside saturate at code 0
or qmax.  Default (``clip=None``): CLIP[bits], 0.1 at 2 bits (the range x 0.8), 0 at 4 bits (plain
min/max).  A fixed fraction, not a per-group search: the range stays a continuous function of the
page, so pages sealed during decode equal those of scoring the same tokens up to rounding ties (an
MSE search over shrink candidates flips whole groups at candidate ties; it also scored worse on the
held-out text: bench/QUALITY_BREAKDOWN.md, "Range clip").  Bytes and decoders are unchanged.

A head_dim that is not a power of two (96, 160, ...; the V group then spans whole planes, hack_layout.py)
runs a second kernel that works plane by plane: each plane of DE channels is a [P, DEP] tile (DEP the
next power of two >= 16, channels >= DE masked), rotated as x @ R[:, plane] when a rotation is fused, and
V's per-token group ranges combine the planes of a group in registers.
"""

import torch

from zipserve.compress.quantize import check_clip, clip_range
from zipserve.kernels.arg_checks import (
    check_kv_pages,
    is_pow2,
    kernel_rows,
    page_strides,
    pages_read,
    put_rows,
    rows_written,
)
from zipserve.kernels.hack_encode_kernels import _hack_encode_kernel, _hack_encode_planes_kernel
from zipserve.kernels.hack_layout import HackPages, check_bits, pack_planar, unpack_planar
from zipserve.kernels.head_dim import block_d, head_dim_error, head_dim_ok
from zipserve.kernels.paged_decode_attention import is_interpreted

__all__ = ["hack_encode_pages", "hack_encode_pages_ref", "hack_dequantize_ref", "CLIP", "clip_for"]


CLIP = {2: 0.1, 4: 0.0}
"""Default range clip per bit width: the fraction of a group's range cut off on each side."""


def clip_for(bits: int, clip: float | None = None) -> float:
    """The range clip used at `bits` (CLIP[bits] when clip is None); ValueError when not a
    float in [0, 0.5)."""
    if clip is None:
        return CLIP[check_bits(bits)]
    return check_clip(clip)


def _check_encode(k, v, bits, group_v, out, page_ids, src_rows=None):
    """Validate; returns (out pool or None, ids).  Raises ValueError naming the argument."""
    bits = check_bits(bits)
    check_kv_pages(k, v)
    n, kvh, page, d = k.shape
    if src_rows is not None:
        if out is None:
            raise ValueError("src_rows needs out (the pool to write into)")
        n = pages_read(k, src_rows)  # pages encoded: rows src_rows of k / v
    e = 8 // bits
    if not is_pow2(page):
        raise ValueError(f"k page_size {page} must be a power of two")
    if not head_dim_ok(d) or d % e:
        raise ValueError(f"{head_dim_error(d, 'k head_dim')} and a multiple of {e} (bits={bits})")
    if is_pow2(d):
        if not isinstance(group_v, int) or not is_pow2(group_v) or d % group_v:
            raise ValueError(
                f"group_v must be a power of two dividing head_dim {d}, got {group_v!r}"
            )
    elif not isinstance(group_v, int) or group_v <= 0 or d % group_v or group_v % (d // e):
        raise ValueError(
            f"group_v must divide head_dim {d} and be a multiple of head_dim / {e} = "
            f"{d // e}, got {group_v!r}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if out is None:
        if page_ids is not None:
            raise ValueError("page_ids needs out (the pool to write into)")
        return None, torch.arange(n, dtype=torch.int32, device=k.device)
    if not isinstance(out, HackPages):
        raise ValueError(f"out must be a HackPages pool, got {type(out).__name__}")
    out.validate()
    if out.bits != bits or out.group_v != group_v:
        raise ValueError(
            f"out has bits={out.bits}, group_v={out.group_v}; asked bits={bits}, group_v={group_v}"
        )
    if (out.num_kv_heads, out.page_size, out.head_dim) != (kvh, page, d) or out.device != k.device:
        raise ValueError(
            f"out pool geometry (KVH, P, D)={(out.num_kv_heads, out.page_size, out.head_dim)} "
            f"on {out.device} does not match k {(kvh, page, d)} on {k.device}"
        )
    if (
        page_ids is None
        or page_ids.dim() != 1
        or page_ids.shape[0] != n
        or page_ids.dtype not in (torch.int32, torch.int64)
        or page_ids.device != k.device
    ):
        raise ValueError(f"page_ids must be int32/int64 [n={n}] on {k.device} when out is given")
    return out, page_ids.contiguous()


def _kernel_is_interpreted() -> bool:
    return is_interpreted(_hack_encode_kernel)


def _check_rotation(rotation, k):
    d = k.shape[-1]
    if rotation is not None and (
        rotation.shape != (d, d)
        or rotation.dtype != torch.float32
        or rotation.device != k.device
        or not rotation.is_contiguous()
    ):
        raise ValueError(f"rotation must be a contiguous float32 [{d}, {d}] on {k.device}")


def hack_encode_pages(
    k,
    v,
    bits,
    group_v=64,
    out=None,
    page_ids=None,
    rotation=None,
    src_rows=None,
    skip_page=None,
    clip=None,
):
    """Quantize full pages k, v [n, KVH, P, D] into a HackPages pool (see module docstring).
    rotation: optional fp32 [D, D]; the pages stored are those of k @ rotation, v @ rotation
    (fused: one read of k and v). On GPU the product runs on tensor cores in tf32.
    src_rows: optional int32 [m]: encode rows src_rows of k / v (any number of rows, read in
    place) into page_ids [m]. skip_page: a page id whose pages are not written (the engine's
    scratch page: decode rows that fill no page). clip: the range clip (module doc; None:
    CLIP[bits], 0: each group's plain min / max)."""
    pool, ids = _check_encode(k, v, bits, group_v, out, page_ids, src_rows)
    _check_rotation(rotation, k)
    clip = clip_for(bits, clip)
    _, kvh, page, d = k.shape
    n = ids.shape[0]
    src, skip = kernel_rows(src_rows, skip_page, n, k.device)
    if pool is None:
        pool = HackPages.empty(n, kvh, page, d, bits, group_v, device=k.device)
    if k.device.type == "cpu" and not _kernel_is_interpreted():
        raise RuntimeError(
            "hack_encode_pages: the Triton kernel cannot run on CPU tensors unless "
            "TRITON_INTERPRET=1 was set before import; use hack_encode_pages_ref on CPU."
        )
    if n == 0 or kvh == 0:
        return pool
    args = (
        k,
        v,
        ids,
        src,
        skip,
        rotation if rotation is not None else k,
        pool.k_codes,
        pool.v_codes,
        pool.k_scale,
        pool.k_min,
        pool.v_scale,
        pool.v_min,
        pool.k_sums,
        pool.v_sums,
        *page_strides(k, v),
    )
    common = dict(
        PAGE=page,
        HEAD_DIM=d,
        BITS=bits,
        GV=group_v,
        ROTATE=rotation is not None,
        ROT_PREC="ieee" if _kernel_is_interpreted() else "tf32",
        CLIP=clip,
    )
    if is_pow2(d):  # whole head at once
        _hack_encode_kernel[(n, kvh)](*args, **common, num_warps=4 if page * d < 8192 else 8)
    else:  # plane by plane (padded planes)
        bd = block_d(d)
        _hack_encode_planes_kernel[(n, kvh)](
            *args,
            **common,
            BLOCK_D=bd,
            DEP=block_d(d // (8 // bits)),
            num_warps=4 if page * bd < 8192 else 8,
        )
    return pool


def _quantize_ref(x, lo, hi, qmax):
    sc = ((hi - lo) / qmax).half().float()
    mn = lo.half().float()
    ok = sc > 0
    y = torch.where(ok, (x - mn) / torch.where(ok, sc, torch.ones_like(sc)), torch.zeros_like(x))
    return torch.floor(y + 0.5).clamp(0, qmax), sc, mn


def hack_encode_pages_ref(
    k,
    v,
    bits,
    group_v=64,
    out=None,
    page_ids=None,
    rotation=None,
    src_rows=None,
    skip_page=None,
    clip=None,
):
    """Pure-torch reference of hack_encode_pages (same signature, same arithmetic; the rotation
    product in fp32)."""
    pool, ids = _check_encode(k, v, bits, group_v, out, page_ids, src_rows)
    _check_rotation(rotation, k)
    clip = clip_for(bits, clip)
    k, v, ids, keep = rows_written(k, v, ids, src_rows, skip_page)
    n, kvh, page, d = k.shape
    if pool is None:
        pool = HackPages.empty(n, kvh, page, d, bits, group_v, device=k.device)
    qmax = (1 << bits) - 1
    kf, vf = k.float(), v.float()  # [n, KVH, P, D]
    if rotation is not None:
        kf, vf = kf @ rotation, vf @ rotation
    kq, ksc, kmn = _quantize_ref(kf, *clip_range(kf, 2, clip), qmax)  # K per channel
    v4 = vf.reshape(n, kvh, page, d // group_v, group_v)  # V per token, groups of group_v
    vq, vsc, vmn = _quantize_ref(v4, *clip_range(v4, -1, clip), qmax)
    vq = vq.reshape(n, kvh, page, d)
    ids = ids.long()
    put_rows(pool.k_codes, ids, pack_planar(kq.to(torch.uint8), bits), keep)
    put_rows(pool.k_scale, ids, ksc[:, :, 0].half(), keep)
    put_rows(pool.k_min, ids, kmn[:, :, 0].half(), keep)
    put_rows(pool.k_sums, ids, kq.sum(-1), keep)
    put_rows(pool.v_codes, ids, pack_planar(vq.to(torch.uint8), bits), keep)
    put_rows(pool.v_scale, ids, vsc[..., 0].half(), keep)
    put_rows(pool.v_min, ids, vmn[..., 0].half(), keep)
    put_rows(pool.v_sums, ids, vq.sum(2), keep)
    return pool


def hack_dequantize_ref(pages: HackPages):
    """Dequantize a whole pool -> (k, v) float32 [num_pages, KVH, P, D].  Tests only."""
    pages.validate()
    n, kvh, page, d = pages.num_pages, pages.num_kv_heads, pages.page_size, pages.head_dim
    kq = unpack_planar(pages.k_codes, pages.bits).float()  # [n, KVH, P, D]
    k = kq * pages.k_scale.float()[:, :, None, :] + pages.k_min.float()[:, :, None, :]
    vq = unpack_planar(pages.v_codes, pages.bits).float().reshape(n, kvh, page, -1, pages.group_v)
    v = vq * pages.v_scale.float()[..., None] + pages.v_min.float()[..., None]
    return k, v.reshape(n, kvh, page, d)
