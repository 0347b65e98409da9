"""The checksums of the KV wire: CRC32 of host bytes (`host_checksum`, pages.py), and a cheap
position-weighted checksum of a device buffer (`device_checksum`, device_pages.py), computed where
the buffer lives (GPU or CPU) so the device transfer path never copies KV to the host to check it.

Definition (what `checksum_reference` spells out word by word): view the buffer as little-endian
uint32 words w_0..w_{m-1} (zero-padded to a multiple of 4 bytes), M = 2**31 - 1, and
    A = sum_i w_i mod M,    B = sum_i (i + 1) * w_i mod M,    checksum = A * 2**31 + B.
A single changed word, and two swapped unequal words, always change it (Fletcher/Adler style,
modulo a prime). `checksum_torch` computes the same value with torch reductions in int64
(chunked so no partial sum overflows; it is the reference of the one-pass Triton kernel
kernels/checksum.py `wsum_checksum`). `device_checksum` picks the kernel on CUDA and torch
elsewhere; all return a 0-dim int64 tensor on the buffer's device without synchronizing
(`.item()` it when the value is needed).
"""

from __future__ import annotations

import struct
import zlib

import torch

MOD = 2**31 - 1
CHUNK = 1024
"""Words per row of the reduction: (j + 1) * w < 2**42, a row sums below 2**52."""
SLAB_ROWS = 4096
"""Rows reduced per pass (bounds the int64 temporaries to 32 MB per slab)."""
ALGORITHM = "wsum31"


def host_checksum(payload: bytes | bytearray | memoryview) -> int:
    """CRC32 of host bytes (the pages of a ZIPKV buffer)."""
    return zlib.crc32(payload)


def checksum_reference(data: bytes | bytearray | memoryview | torch.Tensor) -> int:
    """The definition, one word at a time in Python integers (small buffers only)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    raw = bytes(data)
    raw += b"\x00" * (-len(raw) % 4)
    a = b = 0
    for i, (w,) in enumerate(struct.iter_unpack("<I", raw)):
        a += w
        b += (i + 1) * w
    return (a % MOD) * 2**31 + b % MOD


def combine_rows(
    a_rows: torch.Tensor, b_rows: torch.Tensor, first_word: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """a_rows, b_rows: int64 [R], per row of CHUNK words (row r starts at word
    first_word + r * CHUNK): sum w mod M and sum (j + 1) w mod M with j the index in the row.
    Returns (A, B) over all rows, mod M, as 0-dim int64 tensors."""
    # the row starting at word s adds s * a_row to B: (s mod M) * a_row < 2**62
    starts = (
        first_word + CHUNK * torch.arange(a_rows.shape[0], device=a_rows.device, dtype=torch.int64)
    ) % MOD  # [R]
    b_rows = (b_rows + (starts * a_rows) % MOD) % MOD
    return a_rows.sum() % MOD, b_rows.sum() % MOD  # sums of < 2**31 values: no overflow


def _row_sums(words: torch.Tensor, first_word: int) -> tuple[torch.Tensor, torch.Tensor]:
    """words: int32 [R, CHUNK] starting at global word index first_word.
    Returns (A, B) partial sums mod M over these rows as int64 0-dim tensors."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # [R, CHUNK] uint32 values
    j = torch.arange(1, CHUNK + 1, device=w.device, dtype=torch.int64)  # [CHUNK]
    return combine_rows(w.sum(1) % MOD, (w * j).sum(1) % MOD, first_word)


class PendingChecksum:
    """A checksum queued on the device. `value()` waits for that reduction only (an event
    recorded behind it and a pinned host copy), not for everything else queued on the stream
    since: a sender thread must not wait for the layers the forward pass queued after this one,
    nor a receiver for the decode step running on the same GPU."""

    def __init__(self, value: torch.Tensor):
        """value: 0-dim int64 on any device (e.g. device_checksum's result)."""
        self._event = None
        if value.is_cuda:
            self._host = torch.empty((), dtype=torch.int64, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(value.device))
        else:
            self._host = value

    def done(self) -> bool:
        """True when value() will not wait (the reduction and its host copy have run)."""
        return self._event is None or self._event.query()

    def value(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._host.item())


def device_checksum(buf: torch.Tensor) -> torch.Tensor:
    """The checksum where buf lives: the Triton kernel on CUDA, checksum_torch elsewhere."""
    if buf.is_cuda:
        from zipserve.kernels.checksum import wsum_checksum

        return wsum_checksum(buf)
    return checksum_torch(buf)


def checksum_torch(buf: torch.Tensor) -> torch.Tensor:
    """The checksum of a contiguous tensor's bytes, as a 0-dim int64 tensor on its device."""
    flat = buf.detach().contiguous().reshape(-1).view(torch.uint8)  # [n]
    n = flat.numel()
    a = torch.zeros((), dtype=torch.int64, device=flat.device)
    b = torch.zeros((), dtype=torch.int64, device=flat.device)
    full_rows = n // (4 * CHUNK)
    body = flat[: full_rows * 4 * CHUNK]
    if full_rows and body.data_ptr() % 4:
        body = body.clone()  # int32 view needs 4-byte alignment
    rows = body.view(torch.int32).view(full_rows, CHUNK) if full_rows else None
    for r0 in range(0, full_rows, SLAB_ROWS):
        pa, pb = _row_sums(rows[r0 : r0 + SLAB_ROWS], r0 * CHUNK)
        a, b = (a + pa) % MOD, (b + pb) % MOD
    rest = flat[full_rows * 4 * CHUNK :]
    if rest.numel():  # the last partial row, zero-padded to CHUNK words
        pad = torch.zeros(4 * CHUNK, dtype=torch.uint8, device=flat.device)
        pad[: rest.numel()] = rest
        pa, pb = _row_sums(pad.view(torch.int32).view(1, CHUNK), full_rows * CHUNK)
        a, b = (a + pa) % MOD, (b + pb) % MOD
    return a * 2**31 + b
