"""The CUDA backend of HACK decode attention: page splits on tensor cores (kernels/cuda/hack_decode.cu).

``hack_decode_attention(..., backend="cuda")`` (kernels/hack_decode_attention.py) runs the 16-bit tail
with the Triton kernel (partial slot 0), the quantized pages with this module's kernel (slots 1..S, one
warp per (sequence, KV head, split)), then the same merge.  Same math as the torch reference's "f16"
mode.  What the kernel takes (``unsupported_reason`` says why not, in words):
  * an sm_90 GPU (H100 / H200; the cubin is built for sm_90 only), CUDA (not ROCm);
  * head_dim 128, pages of 64 tokens, GQA group <= 8, 2 or 4 bits, one V group per plane
    (group_v == head_dim * bits / 8, what HackCodec uses), mode "f16".
``cuda_num_splits`` sizes the splits for it (independent warps: more, shorter splits than Triton's).
"""

from __future__ import annotations

import os

import torch

from zipserve.kernels.cuda_driver import CubinModule

__all__ = [
    "CUBIN",
    "VARIANTS",
    "cuda_num_splits",
    "function_name",
    "launch_page_splits",
    "unsupported_reason",
    "variant",
]

CUBIN = CubinModule("hack_decode_sm90.cubin")
_WARPS_PER_BLOCK = 4
# Kernel variants (kernels/cuda/hack_decode.cu): v1 heads on the MMA's M rows; v2 tokens (QK) and
# channels (PV) on M; v2o3 = v2 held to 168 registers (3 blocks per SM).  Warps resident per SM
# at the compiled register counts (offline sm_90: v1 210-218, v2 182, v2o3 168).
VARIANTS = {"v1": 8, "v2": 8, "v2o3": 12}
DEFAULT_VARIANT = "v2o3"
VARIANT_ENV = "ZIPSERVE_HACK_CUDA_VARIANT"
_BITS = (2, 4)
_MIN_PAGES_PER_SPLIT = 4


def variant() -> str:
    """$ZIPSERVE_HACK_CUDA_VARIANT (v1 | v2 | v2o3), default v2o3: on the H100 (session 8) the
    fastest or within 4% of it at 8 x 32k and 1 x 128k for hack2, 1 x 128k for hack4, and within
    4-12% of v2 at twice its splits elsewhere (bench/results/session8_h100/times.csv)."""
    v = os.environ.get(VARIANT_ENV, DEFAULT_VARIANT)
    if v not in VARIANTS:
        raise ValueError(f"${VARIANT_ENV} must be one of {sorted(VARIANTS)}, got {v!r}")
    return v


def function_name(bits: int, var: str | None = None) -> str:
    return f"hack_decode_{var or variant()}_b{bits}"


def unsupported_reason(
    device: torch.device,
    *,
    head_dim: int,
    page_size: int,
    bits: int,
    group_v: int,
    group: int | None,
    mode: str,
) -> str | None:
    """None when the CUDA kernel can run on device with this geometry, else why not."""
    if device.type != "cuda" or torch.version.hip is not None:
        return "the CUDA kernel needs an NVIDIA GPU"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return f"the cubin is built for sm_90, this GPU is sm_{cap[0]}{cap[1]}"
    if mode != "f16":
        return f"mode {mode!r}: the CUDA kernel implements mode 'f16' only"
    if head_dim != 128:
        return f"head_dim {head_dim}: the CUDA kernel takes 128"
    if page_size != 64:
        return f"page_size {page_size}: the CUDA kernel takes 64"
    if bits not in _BITS:
        return f"bits {bits}: the CUDA kernel takes 2 or 4"
    if group_v != head_dim * bits // 8:
        return f"group_v {group_v}: the CUDA kernel takes one V group per plane ({head_dim * bits // 8})"
    if group is not None and not 1 <= group <= 8:
        return f"GQA group {group}: the CUDA kernel takes groups of 1..8"
    if not CUBIN.available():
        return f"missing {CUBIN.path.name} (kernels/cuda/build.sh builds it)"
    return None


def cuda_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132) -> int:
    """Page splits so that batch * heads * splits warps fill the resident warps of every SM once,
    each split keeping >= 4 pages."""
    items = max(1, batch * num_kv_heads)
    wave = -(-VARIANTS[variant()] * num_sms // items)
    max_pages = max(1, max_seq_len // 64)
    return int(max(1, min(wave, max(1, max_pages // _MIN_PAGES_PER_SPLIT), 256)))


def launch_page_splits(
    q_pages: torch.Tensor,  # [B, H, 128] fp32, contiguous, in the pages' basis
    pages,
    page_table: torch.Tensor,  # [B, max_pages] int32
    n_pages: torch.Tensor,  # [B] int32
    part: torch.Tensor,  # [B, H, 1 + S, 128] fp32: slots 1..S written here
    lse: torch.Tensor,  # [B, H, 1 + S] fp32 (log2 domain)
    qk_scale_log2: float,
    n_sink: int,
    num_splits: int,
    var: str | None = None,
) -> None:
    """The page splits of one call: warps (sequence, KV head, split) of kernel variant var (default:
    variant())."""
    b, h, d = q_pages.shape
    kvh = pages.num_kv_heads
    if q_pages.dtype != torch.float32 or not q_pages.is_contiguous():
        raise ValueError("q_pages must be contiguous fp32")
    if part.shape != (b, h, num_splits + 1, d) or lse.shape != (b, h, num_splits + 1):
        raise ValueError("part / lse must have 1 + num_splits slots")
    items = b * kvh * num_splits
    if items == 0:
        return
    grid = (-(-items // _WARPS_PER_BLOCK), 1, 1)
    CUBIN.launch(
        function_name(pages.bits, var),
        grid,
        (32 * _WARPS_PER_BLOCK, 1, 1),
        [
            ("p", q_pages),
            ("p", pages.k_codes),
            ("p", pages.v_codes),
            ("p", pages.k_scale),
            ("p", pages.k_min),
            ("p", pages.v_scale),
            ("p", pages.v_min),
            ("p", page_table),
            ("p", n_pages),
            ("p", part),
            ("p", lse),
            ("f", qk_scale_log2),
            ("i", n_sink),
            ("i", b),
            ("i", kvh),
            ("i", h // kvh),
            ("i", num_splits),
            ("q", q_pages.stride(0)),
            ("q", q_pages.stride(1)),
            ("q", page_table.stride(0)),
        ],
        q_pages.device,
    )
