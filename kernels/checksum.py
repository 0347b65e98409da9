"""Triton kernel of the KV payload checksum (compress/wire/checksum.py defines it): one pass over the
buffer, one program per row of CHUNK uint32 words writing the row's two partial sums; torch
combines the rows (a few thousand values). `wsum_checksum` has the signature of its torch
reference `compress.wire.checksum.checksum_torch` and returns the same value bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zipserve.compress.wire.checksum import CHUNK, MOD, checksum_torch, combine_rows
from zipserve.kernels.paged_decode_attention import require_runnable


@triton.jit
def _row_sums_kernel(words_ptr, n_words, out_ptr, MODULUS: tl.constexpr, CHUNK_WORDS: tl.constexpr):
    row = tl.program_id(0)
    j = tl.arange(0, CHUNK_WORDS)  # [CHUNK]
    idx = row.to(tl.int64) * CHUNK_WORDS + j
    w = tl.load(words_ptr + idx, mask=idx < n_words, other=0)  # int32 [CHUNK]
    w = w.to(tl.uint32, bitcast=True).to(tl.int64)  # the word as unsigned
    a = tl.sum(w, axis=0) % MODULUS  # < 2**42 before the modulo
    b = tl.sum(w * (j + 1).to(tl.int64), axis=0) % MODULUS  # < 2**52 before the modulo
    tl.store(out_ptr + 2 * row, a)
    tl.store(out_ptr + 2 * row + 1, b)


def wsum_checksum(buf: torch.Tensor) -> torch.Tensor:
    """The checksum of a contiguous tensor's bytes as a 0-dim int64 tensor on its device.
    Buffers whose byte count or address is not a multiple of 4 go to the torch reference."""
    flat = buf.detach().contiguous().reshape(-1).view(torch.uint8)  # [n]
    n = flat.numel()
    if n == 0 or n % 4 or flat.data_ptr() % 4:
        return checksum_torch(flat)
    require_runnable("wsum_checksum", _row_sums_kernel, flat)
    words = flat.view(torch.int32)  # [n / 4]
    rows = -(-words.numel() // CHUNK)
    parts = torch.empty(rows, 2, dtype=torch.int64, device=flat.device)  # [rows, (A, B)]
    _row_sums_kernel[(rows,)](words, words.numel(), parts, MODULUS=MOD, CHUNK_WORDS=CHUNK)
    a, b = combine_rows(parts[:, 0], parts[:, 1], 0)
    return a * 2**31 + b
