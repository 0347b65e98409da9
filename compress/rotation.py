"""Orthonormal Hadamard rotation of head_dim, applied to K/V before quantization.

Rotating spreads outlier channels over all channels, which makes low-bit ranges tighter. Attention
is unchanged when the query is rotated the same way (q R . k R = q . k) and the output is rotated
back (p (V R) R^T = p V), so the rotation costs two D x D products per decode step and no
dequantization. A head_dim that is not a power of two (96, 160, ...) gets a block-diagonal Hadamard
matrix: blocks of the largest power of two dividing it (32 for 96), still orthonormal and symmetric.
"""

from __future__ import annotations

import functools

import torch

from zipserve.compress.device_copy import to_device_nowait
from zipserve.kernels.step_constants import kept_outside_capture


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(d: int) -> torch.Tensor:
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"head_dim: Hadamard rotation needs a positive size, got {d}")
    b = d & -d  # the largest power of two dividing d: the block size
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / b**0.5  # [b, b], orthonormal and symmetric
    return torch.block_diag(*[h] * (d // b)).contiguous()  # [D, D]


_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def hadamard(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The [D, D] rotation on `device`, one tensor per (d, device) (never write to it); to a GPU
    through pinned memory, so that the first use (a codec's first import on the decode worker)
    does not make the host wait for the stream. Not kept when made during a CUDA graph capture
    (what a capture allocates is unwritten until the graph replays)."""
    device = torch.device(device)
    if device.type == "cpu":
        return _hadamard_cpu(d)
    if device.type == "cuda" and device.index is None:  # the key hadamard_block looks up
        device = torch.device("cuda", torch.cuda.current_device())
    return kept_outside_capture(
        _ON_DEVICE, (d, device), lambda: to_device_nowait(_hadamard_cpu(d), device)
    )


def hadamard_block(r: torch.Tensor) -> int | None:
    """The Hadamard block size (the largest power of two dividing D) when `r` is the very tensor
    `hadamard` returned, else None: a kernel may then rotate with a fast Walsh-Hadamard butterfly
    (log2(block) add / subtract stages in registers) instead of reading r's D x D values."""
    d = r.shape[-1] if r.dim() == 2 and r.shape[0] == r.shape[1] else 0
    if d < 1:
        return None
    if r.device.type == "cpu":
        hit = r is _hadamard_cpu(d)
    else:
        hit = _ON_DEVICE.get((d, r.device)) is r
    return d & -d if hit else None


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ r [D, D] computed in fp32, returned in x's dtype."""
    return (x.float() @ r).to(x.dtype)
