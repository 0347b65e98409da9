"""Encoded KV pages -> dense pages of a paged pool (decode_kv=dense): one fused Triton kernel per
codec family, each with a pure-torch reference of the same signature.

  * ``fp8_dequant_pages(k, k_scale, v, v_scale, page_ids, out_k, out_v)``
  * ``kivi_dequant_pages(k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, page_ids,
    out_k, out_v)``
  * ``hack_dequant_pages(pages, page_ids, out_k, out_v, rotation=None)``  (pages: a HackPages)
  * ``*_ref``: the same in torch, built on the codecs' own dequantization (compress/quantize.py,
    hack_encode.hack_dequantize_ref), fp32 arithmetic.

Inputs are n encoded pages (the layouts of fp8_decode_attention.py, kivi_decode_attention.py and
hack_layout.py; contiguous, as received off the wire). Input page i is written, K and V, into page
``page_ids[i]`` of ``out_k`` / ``out_v`` [N, KVH, P, D] (float16 / bfloat16 / float32, last dim
contiguous; the engine passes its KVCache layer views). Nothing else of the outputs is touched.

Kernel: grid (n, KVH); one program loads one (page, head)'s codes and scales for K and V once,
dequantizes in fp32 (x = code * scale + min, or fp8 * scale) and stores both [P, D] tiles in the
output dtype. HACK pages stored Hadamard-rotated (HackCodec.rotate) are rotated back in the same
program (x @ R, R orthonormal and symmetric: its own inverse), so the dense pool holds K/V in the
model's basis. The CPU interpreter has no bfloat16: test with float16 / float32 outputs there.
Any head_dim the codec's layout allows: tiles are BLOCK_D = the next power of two >= max(16, D)
wide, channels >= D masked on every load and store (kernels/head_dim.py).
"""

import torch
import triton
import triton.language as tl

from zipserve.compress.quantize import dequant_k, dequant_v
from zipserve.kernels.arg_checks import FLOAT_DTYPES
from zipserve.kernels.hack_encode import hack_dequantize_ref
from zipserve.kernels.hack_layout import HackPages, check_bits, unpack_planar
from zipserve.kernels.head_dim import block_d
from zipserve.kernels.paged_decode_attention import is_interpreted

__all__ = [
    "fp8_dequant_pages",
    "fp8_dequant_pages_ref",
    "kivi_dequant_pages",
    "kivi_dequant_pages_ref",
    "hack_dequant_pages",
    "hack_dequant_pages_ref",
]


@triton.jit
def _store_tile(o_ptr, x, dst, h, stride_on, stride_oh, stride_ot, offs_t, offs_d, td_ok):
    """x [P, BD] fp32 -> out page dst, head h, in the output's dtype (td_ok: the real channels)."""
    ptr = o_ptr + dst * stride_on + h * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :]
    tl.store(ptr, x.to(o_ptr.dtype.element_ty), mask=td_ok)


@triton.jit
def _unpack_tile(
    c_ptr, row, offs_t, offs_d, td_ok, PAGE: tl.constexpr, DE: tl.constexpr, BITS: tl.constexpr
):
    """Planar-packed codes of one (page, head) row -> [P, BD] fp32 codes (channel c lives in byte
    c % DE at bit offset (c // DE) * BITS, hack_layout.pack_planar); 0 past the real channels."""
    byte = tl.load(
        c_ptr + row * (PAGE * DE) + offs_t[:, None] * DE + (offs_d % DE)[None, :],
        mask=td_ok,
        other=0,
    )
    shift = ((offs_d // DE) * BITS)[None, :]
    return ((byte.to(tl.int32) >> shift) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _fp8_dequant_kernel(
    k_ptr,
    ks_ptr,
    v_ptr,
    vs_ptr,
    ids_ptr,  # k/v fp8 [n, KVH, P, D], scales f32 [n, KVH], ids [n]
    ok_ptr,
    ov_ptr,  # out k/v [N, KVH, P, D]
    stride_on,
    stride_oh,
    stride_ot,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = i.to(tl.int64) * tl.num_programs(1) + h  # (page, head) row of the inputs
    dst = tl.load(ids_ptr + i).to(tl.int64)
    offs_t = tl.arange(0, PAGE)
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    td_ok = (offs_t >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]  # [P, BD]
    tile = row * (PAGE * HEAD_DIM) + offs_t[:, None] * HEAD_DIM + offs_d[None, :]  # [P, BD]
    k = tl.load(k_ptr + tile, mask=td_ok, other=0.0).to(tl.float32) * tl.load(ks_ptr + row)
    v = tl.load(v_ptr + tile, mask=td_ok, other=0.0).to(tl.float32) * tl.load(vs_ptr + row)
    _store_tile(ok_ptr, k, dst, h, stride_on, stride_oh, stride_ot, offs_t, offs_d, td_ok)
    _store_tile(ov_ptr, v, dst, h, stride_on, stride_oh, stride_ot, offs_t, offs_d, td_ok)


@triton.jit
def _kivi_dequant_kernel(
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,
    ids_ptr,  # kivi layout (contiguous), ids [n]
    ok_ptr,
    ov_ptr,  # out k/v [N, KVH, P, D]
    stride_on,
    stride_oh,
    stride_ot,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
    TG: tl.constexpr,
    CG: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = i.to(tl.int64) * tl.num_programs(1) + h
    dst = tl.load(ids_ptr + i).to(tl.int64)
    DE: tl.constexpr = HEAD_DIM // (8 // BITS)
    NGK: tl.constexpr = PAGE // TG  # K scale rows per page
    NGV: tl.constexpr = HEAD_DIM // CG  # V scale columns per token
    offs_t = tl.arange(0, PAGE)
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    td_ok = (offs_t >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]  # [P, BD]
    # K per channel over groups of TG tokens: scale/min [NGK, D], row t // TG
    kidx = row * (NGK * HEAD_DIM) + (offs_t // TG)[:, None] * HEAD_DIM + offs_d[None, :]
    k = _unpack_tile(kc_ptr, row, offs_t, offs_d, td_ok, PAGE, DE, BITS) * tl.load(
        ks_ptr + kidx, mask=td_ok, other=0.0
    ).to(tl.float32) + tl.load(km_ptr + kidx, mask=td_ok, other=0.0).to(tl.float32)
    # V per token over groups of CG channels: scale/min [P, NGV], column c // CG
    vidx = row * (PAGE * NGV) + offs_t[:, None] * NGV + (offs_d // CG)[None, :]
    v = _unpack_tile(vc_ptr, row, offs_t, offs_d, td_ok, PAGE, DE, BITS) * tl.load(
        vs_ptr + vidx, mask=td_ok, other=0.0
    ).to(tl.float32) + tl.load(vm_ptr + vidx, mask=td_ok, other=0.0).to(tl.float32)
    _store_tile(ok_ptr, k, dst, h, stride_on, stride_oh, stride_ot, offs_t, offs_d, td_ok)
    _store_tile(ov_ptr, v, dst, h, stride_on, stride_oh, stride_ot, offs_t, offs_d, td_ok)


@triton.jit
def _hack_dequant_kernel(
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,
    ids_ptr,
    rot_ptr,  # HackPages, ids, R [D, D]
    ok_ptr,
    ov_ptr,  # out k/v [N, KVH, P, D]
    stride_on,
    stride_oh,
    stride_ot,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
    GV: tl.constexpr,
    ROTATE: tl.constexpr,
    ROT_PREC: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = i.to(tl.int64) * tl.num_programs(1) + h
    dst = tl.load(ids_ptr + i).to(tl.int64)
    DE: tl.constexpr = HEAD_DIM // (8 // BITS)
    NG: tl.constexpr = HEAD_DIM // GV
    offs_t = tl.arange(0, PAGE)
    offs_d = tl.arange(0, BLOCK_D)  # [BD] channels, >= HEAD_DIM padding
    d_ok = offs_d < HEAD_DIM
    td_ok = (offs_t >= 0)[:, None] & d_ok[None, :]  # [P, BD]
    # K per channel over the page: scale/min [D]
    k = (
        _unpack_tile(kc_ptr, row, offs_t, offs_d, td_ok, PAGE, DE, BITS)
        * tl.load(ks_ptr + row * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        + tl.load(km_ptr + row * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    )
    # V per token in channel groups of GV: scale/min [P, NG], column c // GV
    vidx = row * (PAGE * NG) + offs_t[:, None] * NG + (offs_d // GV)[None, :]
    v = _unpack_tile(vc_ptr, row, offs_t, offs_d, td_ok, PAGE, DE, BITS) * tl.load(
        vs_ptr + vidx, mask=td_ok, other=0.0
    ).to(tl.float32) + tl.load(vm_ptr + vidx, mask=td_ok, other=0.0).to(tl.float32)
    if ROTATE:  # back to the model's basis: x @ R (R orthonormal, symmetric, fp32 [D, D])
        r = tl.load(
            rot_ptr + offs_d[:, None] * HEAD_DIM + offs_d[None, :],
            mask=d_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BD, BD], zero padding
        k = tl.dot(k, r, input_precision=ROT_PREC)
        v = tl.dot(v, r, input_precision=ROT_PREC)
    _store_tile(ok_ptr, k, dst, h, stride_on, stride_oh, stride_ot, offs_t, offs_d, td_ok)
    _store_tile(ov_ptr, v, dst, h, stride_on, stride_oh, stride_ot, offs_t, offs_d, td_ok)


# -- argument checks (shared by kernels and references) --------------------------------------


def check_dense_out(
    n: int,
    kvh: int,
    page: int,
    d: int,
    page_ids: torch.Tensor,
    out_k: torch.Tensor,
    out_v: torch.Tensor,
    device: torch.device,
) -> None:
    """ValueError naming the argument when the outputs or page_ids do not fit n input pages."""
    for name, o in (("out_k", out_k), ("out_v", out_v)):
        if (
            o.dim() != 4
            or tuple(o.shape[1:]) != (kvh, page, d)
            or o.dtype not in FLOAT_DTYPES
            or o.device != device
            or (o.numel() and o.stride(-1) != 1)
        ):
            raise ValueError(
                f"{name}: must be [N, KVH={kvh}, P={page}, D={d}] of {FLOAT_DTYPES} "
                f"on {device} with a contiguous last dim, got {o.dtype} "
                f"{tuple(o.shape)} on {o.device}"
            )
    if out_v.shape != out_k.shape or out_v.stride() != out_k.stride() or out_v.dtype != out_k.dtype:
        raise ValueError("out_v: must match out_k (shape, strides, dtype)")
    if (
        page_ids.dim() != 1
        or page_ids.numel() != n
        or page_ids.device != device
        or page_ids.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"page_ids: must be int32/int64 [n={n}] on {device}, got "
            f"{page_ids.dtype} {tuple(page_ids.shape)} on {page_ids.device}"
        )


def _check_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")


def _require_runnable(name: str, kernel, t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            f"{name}: the Triton kernel cannot run on CPU tensors unless "
            f"TRITON_INTERPRET=1 was set before import; use {name}_ref on CPU."
        )


def _strides(out_k: torch.Tensor) -> tuple[int, int, int]:
    return out_k.stride(0), out_k.stride(1), out_k.stride(2)


def _check_fp8(k, k_scale, v, v_scale, page_ids, out_k, out_v) -> None:
    if k.dim() != 4 or k.dtype != torch.float8_e4m3fn or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(
            f"k/v: must be float8_e4m3fn [n, KVH, P, D] alike, got {k.dtype} "
            f"{tuple(k.shape)} / {v.dtype} {tuple(v.shape)}"
        )
    n, kvh, page, d = k.shape
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if tuple(s.shape) != (n, kvh) or s.dtype != torch.float32 or s.device != k.device:
            raise ValueError(f"{name}: must be float32 [n={n}, KVH={kvh}] on {k.device}")
    _check_contiguous(k=k, v=v, k_scale=k_scale, v_scale=v_scale)
    check_dense_out(n, kvh, page, d, page_ids, out_k, out_v, k.device)


def _check_kivi(k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, page_ids, out_k, out_v):
    e = 8 // check_bits(bits)
    if k_codes.dim() != 4 or k_codes.dtype != torch.uint8 or v_codes.shape != k_codes.shape:
        raise ValueError(
            f"k_codes/v_codes: must be uint8 [n, KVH, P, D/{e}] alike, got "
            f"{tuple(k_codes.shape)} / {tuple(v_codes.shape)}"
        )
    n, kvh, page, de = k_codes.shape
    d = de * e
    if (
        k_scale.dim() != 4
        or tuple(k_scale.shape[:2]) != (n, kvh)
        or k_scale.shape[3] != d
        or page % k_scale.shape[2]
    ):
        raise ValueError(f"k_scale: must be [n, KVH, P // TG, D={d}], got {tuple(k_scale.shape)}")
    if v_scale.dim() != 4 or tuple(v_scale.shape[:3]) != (n, kvh, page) or d % v_scale.shape[3]:
        raise ValueError(f"v_scale: must be [n, KVH, P, D // CG], got {tuple(v_scale.shape)}")
    for name, t, like in (
        ("k_min", k_min, k_scale),
        ("v_min", v_min, v_scale),
        ("k_scale", k_scale, k_scale),
        ("v_scale", v_scale, v_scale),
    ):
        if t.shape != like.shape or t.dtype != torch.float16 or t.device != k_codes.device:
            raise ValueError(f"{name}: must be float16 {tuple(like.shape)} on {k_codes.device}")
    _check_contiguous(
        k_codes=k_codes, v_codes=v_codes, k_scale=k_scale, k_min=k_min, v_scale=v_scale, v_min=v_min
    )
    check_dense_out(n, kvh, page, d, page_ids, out_k, out_v, k_codes.device)


def _check_hack(pages, page_ids, out_k, out_v, rotation) -> None:
    if not isinstance(pages, HackPages):
        raise ValueError(f"pages: must be a HackPages, got {type(pages).__name__}")
    pages.validate()
    d = pages.head_dim
    if rotation is not None and (
        rotation.shape != (d, d)
        or rotation.dtype != torch.float32
        or rotation.device != pages.device
        or not rotation.is_contiguous()
    ):
        raise ValueError(f"rotation: must be a contiguous float32 [{d}, {d}] on {pages.device}")
    check_dense_out(
        pages.num_pages,
        pages.num_kv_heads,
        pages.page_size,
        d,
        page_ids,
        out_k,
        out_v,
        pages.device,
    )


# -- fp8 -------------------------------------------------------------------------------------


def fp8_dequant_pages(k, k_scale, v, v_scale, page_ids, out_k, out_v):
    """fp8 pages k/v [n, KVH, P, D] with scales [n, KVH] -> out pages page_ids (Triton)."""
    _check_fp8(k, k_scale, v, v_scale, page_ids, out_k, out_v)
    _require_runnable("fp8_dequant_pages", _fp8_dequant_kernel, k)
    n, kvh, page, d = k.shape
    if n and kvh:
        _fp8_dequant_kernel[(n, kvh)](
            k,
            k_scale,
            v,
            v_scale,
            page_ids.contiguous(),
            out_k,
            out_v,
            *_strides(out_k),
            PAGE=page,
            HEAD_DIM=d,
            BLOCK_D=block_d(d),
        )


def fp8_dequant_pages_ref(k, k_scale, v, v_scale, page_ids, out_k, out_v):
    """Torch reference of fp8_dequant_pages (Fp8Codec.dequantize's arithmetic)."""
    _check_fp8(k, k_scale, v, v_scale, page_ids, out_k, out_v)
    ids = page_ids.long()
    out_k[ids] = (k.float() * k_scale[:, :, None, None]).to(out_k.dtype)
    out_v[ids] = (v.float() * v_scale[:, :, None, None]).to(out_v.dtype)


# -- kivi ------------------------------------------------------------------------------------


def kivi_dequant_pages(
    k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, page_ids, out_k, out_v
):
    """KIVI pages (kivi_decode_attention.py's layout) -> out pages page_ids (Triton)."""
    _check_kivi(k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, page_ids, out_k, out_v)
    _require_runnable("kivi_dequant_pages", _kivi_dequant_kernel, k_codes)
    n, kvh, page, de = k_codes.shape
    d = de * (8 // bits)
    if n and kvh:
        _kivi_dequant_kernel[(n, kvh)](
            k_codes,
            k_scale,
            k_min,
            v_codes,
            v_scale,
            v_min,
            page_ids.contiguous(),
            out_k,
            out_v,
            *_strides(out_k),
            PAGE=page,
            HEAD_DIM=d,
            BLOCK_D=block_d(d),
            BITS=bits,
            TG=page // k_scale.shape[2],
            CG=d // v_scale.shape[3],
        )


def kivi_dequant_pages_ref(
    k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, page_ids, out_k, out_v
):
    """Torch reference of kivi_dequant_pages (KiviCodec.dequantize's arithmetic)."""
    _check_kivi(k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, page_ids, out_k, out_v)
    ids = page_ids.long()
    out_k[ids] = dequant_k(unpack_planar(k_codes, bits), k_scale, k_min).to(out_k.dtype)
    out_v[ids] = dequant_v(unpack_planar(v_codes, bits), v_scale, v_min).to(out_v.dtype)


# -- hack ------------------------------------------------------------------------------------


def hack_dequant_pages(pages, page_ids, out_k, out_v, rotation=None):
    """HACK pages (a HackPages of n pages) -> out pages page_ids, rotated back by `rotation`
    (fp32 [D, D]) when the pages were stored rotated (Triton)."""
    _check_hack(pages, page_ids, out_k, out_v, rotation)
    _require_runnable("hack_dequant_pages", _hack_dequant_kernel, pages.k_codes)
    n, kvh, page, d = pages.num_pages, pages.num_kv_heads, pages.page_size, pages.head_dim
    if n and kvh:
        interpreted = is_interpreted(_hack_dequant_kernel)
        _hack_dequant_kernel[(n, kvh)](
            pages.k_codes,
            pages.k_scale,
            pages.k_min,
            pages.v_codes,
            pages.v_scale,
            pages.v_min,
            page_ids.contiguous(),
            rotation if rotation is not None else pages.k_scale,
            out_k,
            out_v,
            *_strides(out_k),
            PAGE=page,
            HEAD_DIM=d,
            BLOCK_D=block_d(d),
            BITS=pages.bits,
            GV=pages.group_v,
            ROTATE=rotation is not None,
            ROT_PREC="ieee" if interpreted else "tf32x3",
            num_warps=4 if page * block_d(d) < 8192 else 8,
        )


def hack_dequant_pages_ref(pages, page_ids, out_k, out_v, rotation=None):
    """Torch reference of hack_dequant_pages (HackCodec.dequantize's arithmetic)."""
    _check_hack(pages, page_ids, out_k, out_v, rotation)
    k, v = hack_dequantize_ref(pages)  # fp32 [n, KVH, P, D]
    if rotation is not None:
        k, v = k @ rotation, v @ rotation
    ids = page_ids.long()
    out_k[ids] = k.to(out_k.dtype)
    out_v[ids] = v.to(out_v.dtype)
