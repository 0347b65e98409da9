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
from dataclasses import dataclass

import torch

from zipserve.kernels.cuda_driver import CubinModule

__all__ = [
    "CUBIN",
    "VARIANTS",
    "cuda_num_splits",
    "function_name",
    "launch_page_splits",
    "resident_warps",
    "shared_bytes",
    "stage_bytes",
    "unsupported_reason",
    "variant",
]

CUBIN = CubinModule("hack_decode_sm90.cubin")
_WARPS_PER_BLOCK = 4
_SM_SHARED_BYTES = 228 * 1024  # shared memory per SM on sm_90 (H100 / H200)
_BLOCK_RESERVED_BYTES = 1024  # what the driver keeps per resident block


@dataclass(frozen=True)
class Variant:
    """How a kernel variant of kernels/cuda/hack_decode.cu gets its pages, and the resident 4-warp
    blocks per SM its compiled register count allows (offline sm_90: v2 ~235 registers, the rest
    held to 168 or 128 by __launch_bounds__)."""

    blocks_by_registers: int
    ahead: int = 0  # L2 prefetch of the page this many trips ahead (global loads)
    stages: int = 0  # shared-memory page stages per warp, filled by cp.async (0: global loads)


# v2: tokens (QK) and channels (PV) on the MMA's M rows, global loads; v2o3: v2 held to 168
# registers (3 blocks per SM); v2p1 / v2p2: v2o3 + an L2 prefetch 1 / 2 pages ahead; v2s2 /
# v2s3: v2o3 reading pages from 2 / 3 shared-memory stages per warp, cp.async 1 / 2 pages ahead;
# v2o4 / v2s2o4: v2o3 / v2s2 held to 128 registers (4 blocks, spilling a little to L1).
VARIANTS = {
    "v2": Variant(2),
    "v2o3": Variant(3),
    "v2p1": Variant(3, ahead=1),
    "v2p2": Variant(3, ahead=2),
    "v2s2": Variant(3, stages=2),
    "v2s3": Variant(3, stages=3),
    "v2o4": Variant(4),
    "v2s2o4": Variant(4, stages=2),
}
DEFAULT_VARIANTS = {2: "v2s2", 4: "v2s2"}
"""The variant each bit width runs unless $ZIPSERVE_HACK_CUDA_VARIANT names one (for both): set it
from `python3 -m zipserve.bench.hack_backends`' closing lines (runbook `pipe15`)."""
VARIANT_ENV = "ZIPSERVE_HACK_CUDA_VARIANT"
_BITS = (2, 4)
_MIN_PAGES_PER_SPLIT = 4


def variant(bits: int) -> str:
    """The kernel variant for pages of `bits`: $ZIPSERVE_HACK_CUDA_VARIANT (a key of VARIANTS) or
    DEFAULT_VARIANTS[bits].  v2s2 (cp.async into two shared-memory stages) for both: on the H100
    (session 11, bench/results/session11_h100/issue15/hack_backends, all nine variants at their
    default splits over 8 x 32k, 1 x 128k, 32 x 8k, 8 x 4k and 64 x 8k) the highest geomean
    speed vs SDPA: hack2 2.62x (v2s3 2.55x, v2s2o4 2.32x, v2o3 1.89x), hack4 1.97x (v2s3 1.97x,
    v2o3 1.67x); the `quick` stage's run of the same cells ranked them the same way."""
    v = os.environ.get(VARIANT_ENV) or DEFAULT_VARIANTS[bits]
    if v not in VARIANTS:
        raise ValueError(f"${VARIANT_ENV} must be one of {sorted(VARIANTS)}, got {v!r}")
    return v


def stage_bytes(bits: int) -> int:
    """One page of one KV head as the kernel's shared-memory stage holds it: K and V codes
    [64, 128 * bits / 8], K scales and mins [128] fp16, V scales and mins [64, 8 / bits] fp16."""
    de, ng = 128 * bits // 8, 8 // bits
    return 2 * 64 * de + 2 * 128 * 2 + 2 * 64 * ng * 2


def shared_bytes(var: str, bits: int) -> int:
    """Dynamic shared memory per block of a variant's launch."""
    return _WARPS_PER_BLOCK * VARIANTS[var].stages * stage_bytes(bits)


def resident_warps(var: str, bits: int) -> int:
    """Warps per SM at once: the blocks the registers allow, fewer where shared memory runs out."""
    blocks = VARIANTS[var].blocks_by_registers
    smem = shared_bytes(var, bits)
    if smem:
        blocks = min(blocks, _SM_SHARED_BYTES // (smem + _BLOCK_RESERVED_BYTES))
    return _WARPS_PER_BLOCK * blocks


def function_name(bits: int, var: str | None = None) -> str:
    return f"hack_decode_{var or variant(bits)}_b{bits}"


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


def cuda_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132, bits: int = 2
) -> int:
    """Page splits so that batch * heads * splits warps fill the resident warps of every SM once,
    each split keeping >= 4 pages."""
    items = max(1, batch * num_kv_heads)
    wave = -(-resident_warps(variant(bits), bits) * num_sms // items)
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
    variant(bits))."""
    b, h, d = q_pages.shape
    kvh = pages.num_kv_heads
    if q_pages.dtype != torch.float32 or not q_pages.is_contiguous():
        raise ValueError("q_pages must be contiguous fp32")
    if part.shape != (b, h, num_splits + 1, d) or lse.shape != (b, h, num_splits + 1):
        raise ValueError("part / lse must have 1 + num_splits slots")
    items = b * kvh * num_splits
    if items == 0:
        return
    var = var or variant(pages.bits)
    tensors = (pages.k_codes, pages.v_codes, pages.k_scale, pages.k_min, pages.v_scale, pages.v_min)
    if VARIANTS[var].stages and any(t.data_ptr() % 16 for t in tensors):
        raise ValueError(
            f"variant {var} copies pages in 16-byte chunks: the pool is not 16-byte aligned"
        )
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
        shared_bytes=shared_bytes(var, pages.bits),
    )
