"""A received layer's bytes copied into a decode cache's tensors as one Triton launch.

  * ``copy_rows``      -- Triton kernel + host wrapper.
  * ``copy_rows_ref``  -- pure-torch reference with the same signature (one strided copy or
                          index_copy per job: what the caches' `import_pages` did, about a dozen
                          ops and kernels a layer for a HACK codec).

Session 27's traces (H200, 3 req/s) put a compressed layer's import at 2.8 ms of the decode loop's
host time against 0.4-0.7 ms for bf16, ~70 Python-level torch calls against ~25: each call gives
up the GIL to the worker's other threads. Here a layer is one table upload and one launch.

``copy_rows(payload, dsts, jobs, ids) -> None`` (in place)
  payload  uint8 [N], contiguous: the received buffer.
  dsts     contiguous tensors (any dtype) on payload's device: what the jobs write.
  jobs     RowCopy list; job j copies `rows` rows of `row_bytes` bytes: row r from payload byte
           `src_offset + r * src_stride` to byte `dst_offset + d * dst_stride` of dsts[j.dst],
           where d = ids[r] for an `indexed` job (pages into the pool pages the ids name), r
           otherwise (a tail's heads into a slot).
  ids      host ints (page ids), read by the indexed jobs.
  Every row must lie inside its source and destination (ValueError naming the job otherwise,
  checked on the host from the ints alone: no device value is read). Rows of different jobs must
  not overlap in a destination (which write wins would be undefined).

Kernel: grid (max rows, jobs, chunks of BLOCK words), one program copies one chunk of one row. A
word is 4 bytes when every address, offset, stride and row length is a multiple of 4, else 1.
The job table (addresses, offsets, strides in bytes) and the ids travel in one int64 tensor:
one pinned host-to-device copy that does not make the host wait.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from zipserve.compress.device_copy import index_on
from zipserve.kernels.arg_checks import describe
from zipserve.kernels.paged_decode_attention import require_runnable

__all__ = ["RowCopy", "copy_rows", "copy_rows_ref"]

FIELDS = 7
"""int64s per job in the device table: dst address, src address, rows, row words, src stride,
dst stride (bytes), indexed."""
BLOCK = 1024
"""Words a program copies."""


@dataclass(frozen=True)
class RowCopy:
    """One tensor's rows from the payload into dsts[dst] (module docstring)."""

    dst: int
    dst_offset: int
    src_offset: int
    rows: int
    row_bytes: int
    src_stride: int
    dst_stride: int
    indexed: bool = False


@triton.jit
def _copy_rows_kernel(
    table_ptr,  # int64 [J * FIELDS + n]: the jobs, then the ids
    num_jobs,
    NUM_FIELDS: tl.constexpr,
    WORD_TYPE: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # rows on the axis without the 65535 limit
    j = tl.program_id(1)
    c = tl.program_id(2).to(tl.int64)
    job = table_ptr + j * NUM_FIELDS
    dst_addr = tl.load(job)
    src_addr = tl.load(job + 1)
    rows = tl.load(job + 2)
    row_words = tl.load(job + 3)
    src_stride = tl.load(job + 4)
    dst_stride = tl.load(job + 5)
    indexed = tl.load(job + 6)
    live = r < rows
    idx = tl.load(table_ptr + num_jobs * NUM_FIELDS + r, mask=(indexed != 0) & live, other=0)
    d = tl.where(indexed != 0, idx, r)
    offs = c * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)  # [BLOCK_WORDS]
    ok = offs < tl.where(live, row_words, 0)  # [BLOCK_WORDS]
    src = (src_addr + r * src_stride).to(tl.pointer_type(WORD_TYPE))
    dst = (dst_addr + d * dst_stride).to(tl.pointer_type(WORD_TYPE))
    tl.store(dst + offs, tl.load(src + offs, mask=ok), mask=ok)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check(payload, dsts, jobs, ids) -> None:
    """ValueError naming the argument (module docstring); host ints only."""
    if (
        not isinstance(payload, torch.Tensor)
        or payload.dtype != torch.uint8
        or payload.dim() != 1
        or not payload.is_contiguous()
    ):
        raise ValueError(f"payload must be a contiguous uint8 [N], got {describe(payload)}")
    for i, t in enumerate(dsts):
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            raise ValueError(f"dsts[{i}] must be a contiguous tensor, got {describe(t)}")
        if t.device != payload.device:
            raise ValueError(f"dsts[{i}] is on {t.device}, payload is on {payload.device}")
    id_range: dict[int, tuple[int, int]] = {}
    src_bytes, dst_bytes = _nbytes(payload), [_nbytes(t) for t in dsts]
    for i, job in enumerate(jobs):
        if not 0 <= job.dst < len(dsts):
            raise ValueError(f"jobs[{i}]: dst {job.dst} names no tensor of {len(dsts)}")
        if min(job.rows, job.row_bytes, job.src_offset, job.dst_offset) < 0:
            raise ValueError(f"jobs[{i}]: negative size or offset in {job}")
        if not job.rows or not job.row_bytes:
            continue
        if (job.rows > 1 or job.indexed) and job.dst_stride < job.row_bytes:
            raise ValueError(f"jobs[{i}]: rows {job.dst_stride} bytes apart overlap ({job})")
        if job.rows > 1 and job.src_stride < 0:
            raise ValueError(f"jobs[{i}]: negative source stride ({job})")
        if job.src_offset + (job.rows - 1) * job.src_stride + job.row_bytes > src_bytes:
            raise ValueError(f"jobs[{i}]: rows past the payload's {src_bytes} bytes")
        if job.indexed:
            if len(ids) < job.rows:
                raise ValueError(f"jobs[{i}]: {job.rows} rows, {len(ids)} ids")
            if job.rows not in id_range:  # the jobs of a layer's fields share one page count
                id_range[job.rows] = (min(ids[: job.rows]), max(ids[: job.rows]))
            first, last = id_range[job.rows]
            if first < 0:
                raise ValueError(f"jobs[{i}]: a negative id")
        else:
            last = job.rows - 1
        end = job.dst_offset + last * job.dst_stride + job.row_bytes
        if end > dst_bytes[job.dst]:
            raise ValueError(
                f"jobs[{i}]: rows up to byte {end} of dsts[{job.dst}] ({dst_bytes[job.dst]} bytes)"
            )


def _word(payload, dsts, jobs) -> int:
    """4 when every address, offset, stride and row length is a multiple of 4, else 1."""
    bits = payload.data_ptr()
    for t in dsts:
        bits |= t.data_ptr()
    for j in jobs:
        bits |= j.dst_offset | j.src_offset | j.row_bytes | j.src_stride | j.dst_stride
    return 4 if bits % 4 == 0 else 1


def copy_rows(payload, dsts, jobs, ids) -> None:
    """Every job's rows from payload into dsts (module docstring): one launch."""
    _check(payload, dsts, jobs, ids)
    require_runnable("copy_rows", _copy_rows_kernel, payload)
    jobs = [j for j in jobs if j.rows and j.row_bytes]
    if not jobs:
        return
    word = _word(payload, dsts, jobs)
    base = payload.data_ptr()
    table = []
    for j in jobs:
        table += [
            dsts[j.dst].data_ptr() + j.dst_offset,
            base + j.src_offset,
            j.rows,
            j.row_bytes // word,
            j.src_stride,
            j.dst_stride,
            int(j.indexed),
        ]
    table += list(ids) if any(j.indexed for j in jobs) else []
    table_dev = index_on(table, payload.device)  # [J * FIELDS + n] int64
    max_rows = max(j.rows for j in jobs)
    chunks = triton.cdiv(max(j.row_bytes for j in jobs) // word, BLOCK)
    _copy_rows_kernel[(max_rows, len(jobs), chunks)](
        table_dev,
        len(jobs),
        NUM_FIELDS=FIELDS,
        WORD_TYPE=tl.int32 if word == 4 else tl.uint8,
        BLOCK_WORDS=BLOCK,
    )


def _byte_rows(t: torch.Tensor, offset: int, rows: int, row_bytes: int, stride: int):
    """[rows, row_bytes] uint8 view of contiguous t's bytes from `offset` on, rows `stride` apart."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat.as_strided((rows, row_bytes), (stride, 1), flat.storage_offset() + offset)


def copy_rows_ref(payload, dsts, jobs, ids) -> None:
    """copy_rows in torch: one strided copy (index_copy for indexed jobs) per job."""
    _check(payload, dsts, jobs, ids)
    ids_t = index_on(ids, payload.device) if any(j.indexed for j in jobs) else None  # [n]
    for j in jobs:
        if not j.rows or not j.row_bytes:
            continue
        src = _byte_rows(payload, j.src_offset, j.rows, j.row_bytes, j.src_stride)
        dst_t = dsts[j.dst]
        if not j.indexed:
            _byte_rows(dst_t, j.dst_offset, j.rows, j.row_bytes, j.dst_stride).copy_(src)
            continue
        span = (_nbytes(dst_t) - j.dst_offset - j.row_bytes) // j.dst_stride + 1
        dst = _byte_rows(dst_t, j.dst_offset, span, j.row_bytes, j.dst_stride)
        dst.index_copy_(0, ids_t[: j.rows], src)
