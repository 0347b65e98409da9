"""The checksums of the KV wire: CRC32 of host bytes (`host_checksum`, pages.py), and a cheap
position-weighted checksum of a device buffer (`device_partials`, device_pages.py), computed where
the buffer lives (GPU or CPU) so the device transfer path never copies KV to the host to check it.

Definition (what `checksum_reference` spells out word by word): view the buffer as little-endian
uint32 words w_0..w_{m-1} (zero-padded to a multiple of 4 bytes), M = 2**31 - 1, and
    A = sum_i w_i mod M,    B = sum_i (i + 1) * w_i mod M,    checksum = A * 2**31 + B.
A single changed word, and two swapped unequal words, always change it (Fletcher/Adler style,
modulo a prime).

How it is computed: rows of CHUNK words; row r's two sums (with its start r * CHUNK folded into
B) go to partial p = r mod PROGRAMS. `device_partials` returns those PROGRAMS x (A, B) partials,
each < M, without synchronizing: one Triton launch on CUDA (kernels/checksum.py
`wsum_partials`), `checksum_partials_torch` (its reference, bit for bit) elsewhere.
`combine_partials` finishes on the host from a few hundred integers. A receiver's thread queues
the partials and one small copy per layer (`PendingChecksum`): with the row sums combined by a
dozen torch reductions instead, queueing a layer's checksum took 5.4 ms median, 25 ms p90 on a
busy H100, now 1.0 / 4.6 ms (bench/RESULTS.md, session 16).
"""

from __future__ import annotations

import struct
import zlib

import torch

MOD = 2**31 - 1
CHUNK = 1024
"""Words per row: (j + 1) * w < 2**42, a row's sum below 2**52."""
PROGRAMS = 128
"""Partial sums per buffer (the kernel's programs)."""
SLAB_ROWS = 4096
"""Rows the torch reference reduces per pass (bounds its int64 temporaries to 32 MB)."""
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


def flat_bytes(buf: torch.Tensor) -> torch.Tensor:
    """buf's bytes as a flat uint8 tensor (buf itself when it already is one: no torch call)."""
    if buf.dtype == torch.uint8 and buf.dim() == 1 and buf.is_contiguous():
        return buf
    return buf.detach().contiguous().reshape(-1).view(torch.uint8)


def checksum_partials_torch(buf: torch.Tensor, programs: int = PROGRAMS) -> torch.Tensor:
    """The partials of buf's bytes: int64 [programs, 2] on its device, partial p holding
    (sum of a_r, sum of b_r) mod M over the rows r = p, p + programs, ... where a_r = sum_j w
    and b_r = sum_j (r * CHUNK + j + 1) w (mod M) over row r's words (the last row zero-padded)."""
    flat = flat_bytes(buf)  # [n]
    n = flat.numel()
    pad = -n % (4 * CHUNK)
    if pad or flat.data_ptr() % 4:  # whole rows, 4-byte aligned for the int32 view
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8, device=flat.device)])
    rows = flat.view(torch.int32).view(-1, CHUNK)  # [R, CHUNK]
    out = torch.zeros(programs, 2, dtype=torch.int64, device=flat.device)  # [P, (A, B)]
    j = torch.arange(1, CHUNK + 1, device=flat.device, dtype=torch.int64)  # [CHUNK]
    for r0 in range(0, rows.shape[0], SLAB_ROWS):
        w = rows[r0 : r0 + SLAB_ROWS].to(torch.int64) & 0xFFFFFFFF  # [S, CHUNK] uint32 values
        r = torch.arange(r0, r0 + w.shape[0], device=w.device, dtype=torch.int64)  # [S]
        a = w.sum(1) % MOD  # [S]
        b = ((w * j).sum(1) % MOD + (r * CHUNK % MOD) * a % MOD) % MOD  # [S]
        out.index_add_(0, r % programs, torch.stack([a, b], 1))  # each slot < 2**31 * S
        out %= MOD
    return out


def combine_partials(parts: torch.Tensor) -> int:
    """The checksum from partials [P, 2] (any device; read once)."""
    a_parts, b_parts = zip(*parts.tolist(), strict=True)
    return (sum(a_parts) % MOD) * 2**31 + sum(b_parts) % MOD


def device_partials(buf: torch.Tensor) -> torch.Tensor:
    """buf's checksum partials where it lives: the Triton kernel on CUDA, the torch reference
    elsewhere; queued, not awaited."""
    if buf.is_cuda:
        from zipserve.kernels.checksum import wsum_partials

        return wsum_partials(buf)
    return checksum_partials_torch(buf)


def device_checksum(buf: torch.Tensor) -> int:
    """buf's checksum (waits for it)."""
    return combine_partials(device_partials(buf))


class PendingChecksum:
    """A checksum queued on the device. `value()` waits for that reduction only (an event
    recorded behind it and a pinned host copy of its partials), not for everything else queued
    on the stream since: a sender thread must not wait for the layers the forward pass queued
    after this one, nor a receiver for the decode step running on the same GPU."""

    def __init__(self, parts: torch.Tensor):
        """parts: device_partials' result, on any device."""
        self._event = None
        if parts.is_cuda:
            self._host = torch.empty(parts.shape, dtype=parts.dtype, pin_memory=True)
            self._host.copy_(parts, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(parts.device))
        else:
            self._host = parts

    def done(self) -> bool:
        """True when value() will not wait (the reduction and its host copy have run)."""
        return self._event is None or self._event.query()

    def value(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return combine_partials(self._host)
