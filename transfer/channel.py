"""The `Channel` interface every transport implements, its errors, and the fixed message header.

A channel moves variable-length byte buffers between two endpoints. Each message carries a
user tag (an int >= 0); messages of one tag arrive in the order they were sent, messages of
different tags may be received in any order. A transport that needs framing sends the fixed
`Header` (magic, payload length, tag, CRC32 or -1) and then the payload bytes.

Ownership: after `send(tensor)` the caller must not modify that tensor (a transport may pass it
on without copying). `recv` returns a flat uint8 tensor the caller owns.

What a transport can do is declared on its class (`Channel`'s class attributes, overridden by
each transport): its KV `path`, whether device tensors cross it as device tensors, whether the
receiver can read a message in place (`leases`), whether the sender holds each buffer until the
receiver acknowledges it (`acknowledges`). Callers read these and call the base methods
(`recv_lease`, `limit_inflight`, `wait_acked`), whose defaults are right for a transport that
declares nothing; no caller probes a channel with getattr. transfer/transports.py lists the
transports a prefill/decode pair can choose between.
"""

from __future__ import annotations

import struct
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Buffer = bytes | bytearray | memoryview | torch.Tensor

HEADER_MAGIC = 0x5A4B5631  # "ZKV1"
NO_CRC = -1
CLOSE_TAG = -1
"""Reserved tag of the control message an endpoint sends when it closes."""


class TransferError(RuntimeError):
    """A transfer failed: the peer is gone or incompatible, a checksum failed, misuse."""


class TransferChecksumError(TransferError):
    """A frame's bytes did not match the checksum its sender wrote (the channel's own check)."""


class TransferTimeout(TransferError):
    """Nothing arrived (or could be sent) within the timeout."""


class TransferClosed(TransferError):
    """The channel, or its peer, was closed."""


@dataclass(frozen=True)
class Header:
    """The fixed-size frame before each payload: 4 little-endian int64 values."""

    length: int
    """Payload bytes that follow."""
    tag: int
    """User tag (>= 0) or a reserved control tag (< 0)."""
    crc32: int = NO_CRC
    """zlib.crc32 of the payload, or NO_CRC when the sender did not compute one."""

    NUM_WORDS = 4
    NBYTES = 8 * NUM_WORDS

    def to_tensor(self) -> torch.Tensor:
        """int64 [4]: magic, length, tag, crc32."""
        return torch.tensor([HEADER_MAGIC, self.length, self.tag, self.crc32], dtype=torch.int64)

    def to_bytes(self) -> bytes:
        return struct.pack("<4q", HEADER_MAGIC, self.length, self.tag, self.crc32)

    @classmethod
    def from_words(cls, words: list[int] | tuple[int, ...]) -> Header:
        magic, length, tag, crc = (int(w) for w in words)
        if magic != HEADER_MAGIC or length < 0:
            raise TransferError(f"corrupt message header (magic {magic:#x}, length {length})")
        return cls(length, tag, crc)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Header:
        return cls.from_words(t.cpu().tolist())

    @classmethod
    def from_bytes(cls, b: bytes) -> Header:
        return cls.from_words(struct.unpack("<4q", b))


def as_byte_tensor(buf: Buffer) -> torch.Tensor:
    """A flat uint8 view of buf (a copy for Python byte objects, a view for tensors)."""
    if isinstance(buf, torch.Tensor):
        t = buf.contiguous().reshape(-1)
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8)


def crc32_of(t: torch.Tensor) -> int:
    """zlib.crc32 of a uint8 tensor's bytes (copies to CPU if needed)."""
    return zlib.crc32(t.cpu().numpy()) if t.numel() else 0


def check_tag(tag: int) -> int:
    if not isinstance(tag, int) or tag < 0 or tag >= 2**63:
        raise TransferError(f"tag must be an int in [0, 2**63), got {tag!r}")
    return tag


@dataclass
class Lease:
    """A received buffer the receiver reads in place; release() when done (idempotent)."""

    tensor: torch.Tensor | None
    _release: Callable[[], None] | None = field(default=None, repr=False)
    ready: object = None
    """torch.cuda.Event after which `tensor` may be read (streams wait on it; None: now)."""
    map_ms: float = 0.0
    """How long mapping the sender's buffer took the receiving thread (CUDA IPC; else 0)."""

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Channel(ABC):
    """One endpoint of a two-party, bidirectional, tagged message channel."""

    path: str = ""
    """The KV path this transport is (a key of transfer.transports.TRANSPORTS, or "in_process"
    for two engines of one process)."""
    carries_device_tensors: bool = False
    """True when a CUDA tensor handed to send() reaches the receiver as a device tensor without
    passing through host memory (in-process, CUDA IPC, NCCL): KV then travels in its device
    form (transfer/kv_messages.py); else as host bytes."""
    leases: bool = False
    """True when recv_lease maps the sender's buffer in place (CUDA IPC): the receiver reads it
    and release()s it; the default recv_lease hands out an owned copy."""
    acknowledges: bool = False
    """True when the sender holds each sent buffer until the receiver gives it back (CUDA IPC):
    limit_inflight bounds those bytes and wait_acked waits for them."""

    def __init__(self) -> None:
        self._stats_lock = threading.Lock()
        self.bytes_sent = 0
        """Payload bytes handed to send() so far (headers not counted)."""
        self.bytes_received = 0
        """Payload bytes returned by recv() so far."""
        self.messages_sent = 0
        self.messages_received = 0
        self.ack_wait_s = 0.0
        """Seconds send() has spent, in all, waiting for the receiver to give buffers back
        (`limit_inflight`); stays 0 for a transport that does not `acknowledge`."""
        self.export_s = 0.0
        """Seconds send() has spent, in all, exporting device buffers for the peer to map (CUDA
        IPC's handles); stays 0 for a transport that copies the bytes."""

    @abstractmethod
    def send(self, buf: Buffer, tag: int) -> None:
        """Send one message; returns once the transport has taken it (not necessarily
        delivered). Raises TransferError (TransferClosed, TransferTimeout) on failure."""

    @abstractmethod
    def recv(self, tag: int, timeout: float | None = None) -> torch.Tensor:
        """The next message of this tag as a flat uint8 tensor. Waits at most timeout seconds
        (None: forever) and raises TransferTimeout; raises TransferClosed when the peer closed
        and no message of this tag is left."""

    @abstractmethod
    def close(self) -> None:
        """Release the endpoint; idempotent. Afterwards send and recv on it raise
        TransferClosed; the peer can still take the messages that already reached it, and
        then its recv raises TransferClosed too."""

    def recv_lease(self, tag: int, timeout: float | None = None) -> Lease:
        """The next message of this tag for reading; release() the lease when done. Here: the
        message of recv(), owned by the caller (nothing to give back)."""
        return Lease(self.recv(tag, timeout))

    def limit_inflight(self, nbytes: int) -> None:  # noqa: B027 (a no-op unless overridden)
        """Let sends wait while more than nbytes are unacknowledged (when `acknowledges`; a
        no-op otherwise)."""

    def wait_acked(self, timeout: float) -> bool:
        """Block until the receiver gave back every sent buffer (True) or timeout (False); True
        at once for a transport that does not `acknowledge`."""
        return True

    def flush(self, timeout: float | None = None) -> None:  # noqa: B027 (a no-op unless overridden)
        """Wait until every sent message was handed to the transport (a shaped link hands them
        over later: transfer/link.py); raises what such a deferred hand-off raised. Here every
        send hands its message over before it returns: nothing to wait for."""

    def ack_wait_fraction(self, window_s: float) -> float:
        """Share of the last window_s seconds that sends spent waiting for the receiver to give
        buffers back (`limit_inflight`); 0 for a transport that does not `acknowledge`."""
        return 0.0

    def _count_sent(self, nbytes: int) -> None:
        with self._stats_lock:
            self.bytes_sent += nbytes
            self.messages_sent += 1

    def _count_ack_wait(self, seconds: float) -> None:
        with self._stats_lock:
            self.ack_wait_s += seconds

    def _count_export(self, seconds: float) -> None:
        with self._stats_lock:
            self.export_s += seconds

    def _count_received(self, nbytes: int) -> None:
        with self._stats_lock:
            self.bytes_received += nbytes
            self.messages_received += 1

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
