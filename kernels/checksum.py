"""Triton kernel of the KV payload checksum's partials (compress/wire/checksum.py defines the
checksum and the partials): one launch, PROGRAMS programs, program p reducing rows p, p + PROGRAMS,
... of CHUNK uint32 words and writing its (A, B) pair mod M. `wsum_partials` has the signature of
its torch reference `compress.wire.checksum.checksum_partials_torch` and returns the same values
bit for bit; the host combines them (`combine_partials`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zipserve.compress.wire.checksum import (
    CHUNK,
    MOD,
    PROGRAMS,
    checksum_partials_torch,
    flat_bytes,
)
from zipserve.kernels.paged_decode_attention import require_runnable


@triton.jit
def _partials_kernel(
    words_ptr, n_words, n_rows, out_ptr, MODULUS: tl.constexpr, CHUNK_WORDS: tl.constexpr
):
    p = tl.program_id(0)
    step = tl.num_programs(0)
    j = tl.arange(0, CHUNK_WORDS)  # [CHUNK]
    acc_a = tl.sum(tl.zeros([CHUNK_WORDS], dtype=tl.int64), axis=0)  # 0-dim int64
    acc_b = acc_a
    for k in range(0, tl.cdiv(n_rows - p, step)):
        start = (p + k * step).to(tl.int64) * CHUNK_WORDS  # row p + k * step
        idx = start + j
        w = tl.load(words_ptr + idx, mask=idx < n_words, other=0)  # int32 [CHUNK]
        w = w.to(tl.uint32, bitcast=True).to(tl.int64)  # the word as unsigned
        a = tl.sum(w, axis=0) % MODULUS  # < 2**42 before the modulo
        b = tl.sum(w * (j + 1).to(tl.int64), axis=0) % MODULUS  # < 2**52 before the modulo
        b = (b + (start % MODULUS) * a % MODULUS) % MODULUS  # the row's start folded in
        acc_a += a  # < 2**31 per row: no overflow below 2**32 rows
        acc_b += b
    tl.store(out_ptr + 2 * p, acc_a % MODULUS)
    tl.store(out_ptr + 2 * p + 1, acc_b % MODULUS)


def wsum_partials(buf: torch.Tensor, programs: int = PROGRAMS) -> torch.Tensor:
    """The checksum partials of buf's bytes: int64 [programs, 2] on its device, queued (one
    launch). Buffers whose byte count or address is not a multiple of 4 go to the reference."""
    flat = flat_bytes(buf)  # [n]
    n = flat.numel()
    if n == 0 or n % 4 or flat.data_ptr() % 4:
        return checksum_partials_torch(flat, programs)
    require_runnable("wsum_partials", _partials_kernel, flat)
    words = flat.view(torch.int32)  # [n / 4]
    parts = torch.empty(programs, 2, dtype=torch.int64, device=flat.device)  # [P, (A, B)]
    rows = -(-words.numel() // CHUNK)
    _partials_kernel[(programs,)](words, words.numel(), rows, parts, MODULUS=MOD, CHUNK_WORDS=CHUNK)
    return parts
