"""A decode step's query projected into a low-rank codec's page basis, in one Triton launch.

  * ``project_query``      -- Triton kernel + host wrapper (GQA).
  * ``project_query_ref``  -- pure-torch fp32 reference with the same signature (the einsum
                              compress/lowrank.py ran before: a cast, two layout copies and a
                              batched fp32 matmul, four launches per layer on a GPU).

``project_query(q, basis) -> q_red``
  q       [B, H, D]    float16 / bfloat16 / float32, after RoPE, last dim contiguous; H = KVH * G
                       (head h reads kv head h // G)
  basis   [KVH, D, W]  float32, contiguous: kv head j's projection (lowrank+hack: k_dec at the
                       pages' width, times HACK's rotation R)
  q_red   [B, H, W]    float32, contiguous: q_red[b, h] = q[b, h] @ basis[h // G]

The product is exact fp32 (q widened, products summed in fp32 FMAs, not tf32 tensor cores): the
pages' scores are q_red . codes, and the torch reference is the fp32 einsum.

Kernel: grid (B, KVH); one program holds the G query heads of a kv head as a [G_PAD, W] fp32
accumulator and walks D in BLOCK_K-column chunks (q [G_PAD, BLOCK_K] x basis [BLOCK_K, W],
broadcast and summed over the chunk). At Llama-3-8B's shape (G 4, D 128, W 64) that is 64 fp32
products per thread per chunk with 4 warps. No host syncs: CUDA graphs capture it.
"""

import torch
import triton
import triton.language as tl

from zipserve.kernels.arg_checks import FLOAT_DTYPES, describe
from zipserve.kernels.paged_decode_attention import require_runnable

__all__ = ["project_query", "project_query_ref"]

BLOCK_K = 32  # D columns per step of the reduction


@triton.jit
def _project_query_kernel(
    q_ptr,  # [B, H, D], last dim contiguous
    basis_ptr,  # [KVH, D, W] fp32, contiguous
    out_ptr,  # [B, H, W] fp32, contiguous
    stride_qb,
    stride_qh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    WIDTH: tl.constexpr,
    W_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    g = tl.arange(0, G_PAD)  # [G_PAD] query heads of kv head j
    w = tl.arange(0, W_PAD)  # [W_PAD]
    kk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    heads = j * G + g
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh  # [G_PAD, 1]
    b_base = basis_ptr + j * HEAD_DIM * WIDTH
    acc = tl.zeros((G_PAD, W_PAD), dtype=tl.float32)
    for k0 in tl.static_range(0, HEAD_DIM, BLOCK_K):
        d = k0 + kk  # [BLOCK_K]
        qc = tl.load(
            q_rows + d[None, :], mask=(g[:, None] < G) & (d[None, :] < HEAD_DIM), other=0.0
        ).to(tl.float32)  # [G_PAD, BLOCK_K]
        bc = tl.load(
            b_base + d[:, None] * WIDTH + w[None, :],
            mask=(d[:, None] < HEAD_DIM) & (w[None, :] < WIDTH),
            other=0.0,
        )  # [BLOCK_K, W_PAD] fp32
        acc += tl.sum(qc[:, :, None] * bc[None, :, :], axis=1)  # [G_PAD, W_PAD]
    out = out_ptr + (b * (G * tl.num_programs(1)) + heads[:, None]) * WIDTH + w[None, :]
    tl.store(out, acc, mask=(g[:, None] < G) & (w[None, :] < WIDTH))


def _check(q, basis) -> None:
    """The arguments both paths share (module docstring); ValueError naming the argument. Shapes,
    dtypes, devices and strides only: no value is read."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be [B, H, D] of {FLOAT_DTYPES}, got {describe(q)}")
    b, h, d = q.shape
    if (
        not isinstance(basis, torch.Tensor)
        or basis.dim() != 3
        or basis.shape[1] != d
        or basis.dtype != torch.float32
    ):
        raise ValueError(f"basis must be float32 [KVH, D={d}, W], got {describe(basis)}")
    kvh = basis.shape[0]
    if kvh == 0 or h % kvh:
        raise ValueError(f"basis has {kvh} kv heads, which must divide q's {h} heads")
    if basis.device != q.device:
        raise ValueError(f"basis is on {basis.device}, q is on {q.device}")


def project_query(q: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] @ basis[h // G] -> fp32 [B, H, W] (module docstring), one launch, no host sync."""
    _check(q, basis)
    require_runnable("project_query", _project_query_kernel, q)
    b, h, d = q.shape
    kvh, _, w = basis.shape
    out = torch.empty((b, h, w), dtype=torch.float32, device=q.device)
    if b == 0 or w == 0:
        return out
    if q.stride(-1) != 1:
        raise ValueError(f"q must have a contiguous last dim, got strides {q.stride()}")
    if not basis.is_contiguous():
        raise ValueError(f"basis must be contiguous, got strides {basis.stride()}")
    g = h // kvh
    _project_query_kernel[(b, kvh)](
        q,
        basis,
        out,
        q.stride(0),
        q.stride(1),
        G=g,
        G_PAD=max(triton.next_power_of_2(g), 2),
        HEAD_DIM=d,
        WIDTH=w,
        W_PAD=triton.next_power_of_2(w),
        BLOCK_K=min(BLOCK_K, triton.next_power_of_2(d)),
        num_warps=4,
    )
    return out


def project_query_ref(q: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """torch reference of project_query (same signature): the fp32 einsum, contiguous."""
    _check(q, basis)
    b, h, d = q.shape
    kvh, _, w = basis.shape
    q4 = q.float().reshape(b, kvh, h // kvh, d)  # [B, KVH, G, D]
    return torch.einsum("bkgd,kdw->bkgw", q4, basis).reshape(b, h, w).contiguous()
