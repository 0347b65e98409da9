"""Head sizes the attention kernels take, and the padded tile width they compute in.

Every kernel (and its torch reference) takes an even head_dim in [8, 256]: real Llama-family
checkpoints use 64, 80, 96, 100, 128, 256 and, when small, 8, 16 or 32. Triton tiles need
power-of-two extents and ``tl.dot`` needs K >= 16, so a kernel computes on ``block_d(D)`` channels
(the next power of two >= max(16, D)) and masks channels >= D on every load and store: the padding
lives in registers only, nothing in the cache or the inputs is copied or padded.
"""

from __future__ import annotations

MIN_HEAD_DIM = 8
MAX_HEAD_DIM = 256


def head_dim_ok(d: int) -> bool:
    """An even integer in [MIN_HEAD_DIM, MAX_HEAD_DIM]."""
    return (
        isinstance(d, int)
        and not isinstance(d, bool)
        and d % 2 == 0
        and MIN_HEAD_DIM <= d <= MAX_HEAD_DIM
    )


def head_dim_error(d, name: str = "head_dim") -> str:
    return f"{name} must be an even number in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}"


def check_head_dim(d, name: str = "head_dim") -> int:
    """d, or ValueError naming `name` when the kernels cannot take it."""
    if not head_dim_ok(d):
        raise ValueError(head_dim_error(d, name))
    return d


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def block_d(d: int, lo: int = 16) -> int:
    """The power-of-two tile width (>= lo, the smallest tl.dot K) a kernel uses for d channels."""
    return max(lo, next_pow2(d))
