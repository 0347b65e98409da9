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


def hadamard(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The [D, D] rotation on `device`; to a GPU through pinned memory, so that the first use
    (a codec's first import on the decode worker) does not make the host wait for the stream."""
    return to_device_nowait(_hadamard_cpu(d), device)


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ r [D, D] computed in fp32, returned in x's dtype."""
    return (x.float() @ r).to(x.dtype)
