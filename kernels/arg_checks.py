"""Small facts every kernel wrapper checks its arguments against: the float dtypes a kernel takes,
the power-of-two rule of Triton tile extents, and the full pages (and rows read in place) an
encoder takes."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The activation / KV dtypes every kernel and its torch reference take."""


def is_pow2(x: int) -> bool:
    """x is a positive power of two (a Triton tile extent)."""
    return x > 0 and (x & (x - 1)) == 0


def check_kv_pages(k, v) -> None:
    """k, v: full pages [n, KVH, page_size, head_dim] of one float dtype on one device, as the
    page encoders take them; ValueError naming the argument otherwise."""
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(
            f"k must be [n_pages, KVH, page_size, head_dim], got {getattr(k, 'shape', k)!r:.80}"
        )
    if not isinstance(v, torch.Tensor) or v.shape != k.shape:
        raise ValueError(f"v shape {tuple(getattr(v, 'shape', ()))} != k shape {tuple(k.shape)}")
    if k.dtype not in FLOAT_DTYPES or v.dtype != k.dtype:
        raise ValueError(
            f"k/v dtype must be one of {FLOAT_DTYPES} and equal, got k {k.dtype}, v {v.dtype}"
        )
    if v.device != k.device:
        raise ValueError(f"v is on {v.device}, k is on {k.device}")


def pages_read(k, src_rows) -> int:
    """How many pages an encoder writes: k's n, or with src_rows (int32 [m] on k's device: page i
    is row src_rows[i] of k / v, a decode step's open pages read in place) m; ValueError naming
    src_rows otherwise."""
    if src_rows is None:
        return k.shape[0]
    if (
        not isinstance(src_rows, torch.Tensor)
        or src_rows.dim() != 1
        or src_rows.dtype != torch.int32
        or src_rows.device != k.device
    ):
        raise ValueError(
            f"src_rows must be int32 [m] on {k.device}, got "
            f"{getattr(src_rows, 'dtype', type(src_rows).__name__)} "
            f"{tuple(getattr(src_rows, 'shape', ()))} on {getattr(src_rows, 'device', None)}"
        )
    return src_rows.shape[0]
