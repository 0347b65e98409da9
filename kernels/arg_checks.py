"""Small facts every kernel wrapper checks its arguments against: the float dtypes a kernel takes,
the power-of-two rule of Triton tile extents, and the full pages (and rows read in place) an
encoder takes."""

import torch

from zipserve.kernels.step_constants import row_ids

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The activation / KV dtypes every kernel and its torch reference take."""


def describe(x) -> str:
    """An argument as error messages name it: dtype, shape and device of a tensor, else its type."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)} on {x.device}"
    return type(x).__name__


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


def check_page_ids(page_ids, m: int, device, name: str = "page_ids") -> None:
    """page_ids: an int32 / int64 [m] tensor on device (the pool pages an encoder writes, or
    another per-page id vector: `name`); ValueError naming it otherwise."""
    if (
        not isinstance(page_ids, torch.Tensor)
        or page_ids.dim() != 1
        or page_ids.shape[0] != m
        or page_ids.dtype not in (torch.int32, torch.int64)
        or page_ids.device != device
    ):
        raise ValueError(
            f"{name} must be an int32/int64 [m={m}] tensor on {device}, got "
            f"{getattr(page_ids, 'dtype', type(page_ids).__name__)} "
            f"{tuple(getattr(page_ids, 'shape', ()))} on {getattr(page_ids, 'device', None)}"
        )


def check_store(store, want: dict, device, note: str = "") -> None:
    """store[name] is a tensor of want[name] = (shape, dtype) on device, for every name;
    ValueError naming the entry otherwise (note: appended to the expectation, e.g. the bits)."""
    for name, (shape, dtype) in want.items():
        t = store.get(name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
            raise ValueError(f"store[{name!r}] must be {dtype} {shape}{note}, got {got:.80}")
        if t.device != device:
            raise ValueError(f"store[{name!r}] is on {t.device}, k is on {device}")


def check_kernel_layout(k, v, store, names) -> None:
    """What a Triton encoder needs beyond its reference: k / v with a contiguous last dim and
    the store tensors `names` contiguous; ValueError naming the argument otherwise."""
    for name, t in (("k", k), ("v", v)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    for name in names:
        if not store[name].is_contiguous():
            raise ValueError(f"store[{name!r}] must be contiguous")


def kernel_rows(src_rows, skip_page, m: int, device) -> tuple[torch.Tensor, int]:
    """An encoder kernel's (src [m] int32, skip) arguments: page i reads row src[i] (row i
    without src_rows); programs whose page is skip (-1: none) write nothing."""
    src = row_ids(m, device) if src_rows is None else src_rows
    return src, -1 if skip_page is None else int(skip_page)


def page_strides(k, v) -> tuple[int, ...]:
    """An encoder kernel's input strides: page, head and token of k, then of v ([n, KVH, P, D],
    last dim contiguous)."""
    return (*k.stride()[:3], *v.stride()[:3])


def rows_written(k, v, page_ids, src_rows, skip_page, skip_ids=None):
    """A reference encoder's inputs as the kernel sees them: the rows src_rows of k / v (all
    without it), their page ids, and keep (bool [m], None: every row), False for the rows whose
    page (or skip_ids entry, when given) is skip_page. Returns (k, v, page_ids, keep). The shapes
    do not depend on the values (no boolean-mask select): a reference the engine runs on a GPU
    (KIVI at head_dim 96) runs inside a CUDA graph's capture, which cannot wait for the device;
    write with put_rows."""
    if src_rows is not None:
        k, v = k[src_rows.long()], v[src_rows.long()]
    keep = None
    if skip_page is not None:
        keep = (page_ids if skip_ids is None else skip_ids) != skip_page  # [m]
    return k, v, page_ids, keep


def put_rows(dst: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, keep) -> None:
    """dst[ids] = rows for the rows keep marks (every row when keep is None); the other rows
    write back what dst[ids] held. Skipped ids may repeat (the scratch page), each copy writing
    the same old value; kept ids are distinct and differ from the skipped ones."""
    rows = rows.to(dst.dtype)
    if keep is not None:
        mask = keep.view(-1, *[1] * (rows.dim() - 1))  # [m, 1, ...]
        rows = torch.where(mask, rows, dst[ids])
    dst[ids] = rows
