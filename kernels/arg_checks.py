"""Small facts every kernel wrapper checks its arguments against: the float dtypes a kernel takes
and the power-of-two rule of Triton tile extents."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The activation / KV dtypes every kernel and its torch reference take."""


def is_pow2(x: int) -> bool:
    """x is a positive power of two (a Triton tile extent)."""
    return x > 0 and (x & (x - 1)) == 0
