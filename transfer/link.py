"""`LinkEmulator`: shapes any Channel's sends like a link of given bandwidth and latency.

The link is one shared resource: each send reserves the next free slot of
bytes * 8 / (gbps * 1e9) seconds on it (a busy-until timestamp, so concurrent or back-to-back
sends queue behind each other like on a real wire), then sleeps until its slot ends plus the
latency, then hands the buffer to the wrapped channel. Off by default (no bandwidth limit, no
latency): then send passes straight through. Receives are not shaped.

The hand-off to the wrapped channel comes after the slot: while it runs (CUDA-IPC export, a
gloo send) the emulated link carries nothing, unless another thread's send is queued. A real
NIC would carry the next message meanwhile; `LinkUsage.handoff` says how much of a window went
to hand-offs, beside `busy`, so a transfer phase longer than its wire time can be put down to
them or not, and `LinkUsage.ack_wait` how much of it the wrapped channel spent waiting for the
receiver to give buffers back (CUDA IPC's in-flight cap) rather than exporting and posting.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch

from zipserve.transfer.channel import Buffer, Channel, Lease
from zipserve.transfer.spans import SpanLog


@dataclass(frozen=True)
class LinkUsage:
    """Fractions of a window: the link transmitting (`busy`), hand-offs to the wrapped channel
    after a slot (`handoff`), and the wrapped channel's sends waiting for the receiver's
    acknowledgements (`ack_wait`, part of the hand-offs; 0 for a transport without them)."""

    busy: float
    handoff: float
    ack_wait: float = 0.0

    @staticmethod
    def mean(usages: list[LinkUsage | None]) -> LinkUsage | None:
        got = [u for u in usages if u is not None]
        if not got:
            return None
        return LinkUsage(*(math.fsum(col) / len(got) for col in zip(*(_fields(u) for u in got))))


def _fields(u: LinkUsage) -> tuple[float, float, float]:
    return u.busy, u.handoff, u.ack_wait


class LinkEmulator(Channel):
    def __init__(
        self,
        inner: Channel,
        gbps: float | None = None,
        latency_ms: float = 0.0,
        history_s: float = 60.0,
    ) -> None:
        """inner: the channel to shape. gbps: link bandwidth in Gb/s (None: unlimited).
        latency_ms: one-way latency added to every send. history_s: how far back
        busy_fraction can look."""
        super().__init__()
        if gbps is not None and gbps <= 0:
            raise ValueError(f"gbps must be positive or None, got {gbps}")
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        self.inner, self.gbps, self.latency_ms = inner, gbps, latency_ms
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self._busy = SpanLog(history_s)  # slots on the wire
        self._handoffs = SpanLog(history_s)  # inner.send calls after a slot

    # what the wrapped transport declares (transfer/channel.py), passed through
    @property
    def path(self) -> str:  # type: ignore[override]
        return self.inner.path

    @property
    def carries_device_tensors(self) -> bool:  # type: ignore[override]
        return self.inner.carries_device_tensors

    @property
    def leases(self) -> bool:  # type: ignore[override]
        return self.inner.leases

    @property
    def acknowledges(self) -> bool:  # type: ignore[override]
        return self.inner.acknowledges

    def recv_lease(self, tag: int, timeout: float | None = None) -> Lease:
        lease = self.inner.recv_lease(tag, timeout)
        self._count_received(lease.tensor.numel())
        return lease

    def limit_inflight(self, nbytes: int) -> None:
        self.inner.limit_inflight(nbytes)

    def wait_acked(self, timeout: float) -> bool:
        return self.inner.wait_acked(timeout)

    @property
    def enabled(self) -> bool:
        return self.gbps is not None or self.latency_ms > 0

    def transmit_seconds(self, nbytes: int) -> float:
        """Serialization time of nbytes on this link (0 when unlimited)."""
        return 0.0 if self.gbps is None else nbytes * 8 / (self.gbps * 1e9)

    def send(self, buf: Buffer, tag: int) -> None:
        nbytes = (
            buf.numel() * buf.element_size()
            if isinstance(buf, torch.Tensor)
            else memoryview(buf).nbytes
        )
        if self.enabled:
            tx = self.transmit_seconds(nbytes)
            with self._lock:
                start = max(time.monotonic(), self._busy_until)
                self._busy_until = start + tx
                done = self._busy_until + self.latency_ms / 1e3
            self._busy.add(start, start + tx)
            _sleep_until(done)
            t0 = time.monotonic()
            self.inner.send(buf, tag)
            self._handoffs.add(t0, time.monotonic())
        else:
            self.inner.send(buf, tag)
        self._count_sent(nbytes)

    def recv(self, tag: int, timeout: float | None = None) -> torch.Tensor:
        msg = self.inner.recv(tag, timeout)
        self._count_received(msg.numel())
        return msg

    def close(self) -> None:
        self.inner.close()

    def busy_fraction(self, window_s: float = 1.0) -> float:
        """Fraction of the last window_s seconds during which the link was transmitting."""
        return self._busy.fraction(window_s)

    def usage(self, window_s: float = 1.0) -> LinkUsage:
        """busy_fraction, the fraction spent handing messages to the wrapped channel, and of that
        the wrapped channel's waits for acknowledgements."""
        return LinkUsage(
            self._busy.fraction(window_s),
            self._handoffs.fraction(window_s),
            self.inner.ack_wait_fraction(window_s),
        )

    def ack_wait_fraction(self, window_s: float) -> float:
        return self.inner.ack_wait_fraction(window_s)


def _sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(left)


def unshaped(channel: Channel) -> Channel:
    """The transport under a LinkEmulator (the channel itself when it is not shaped)."""
    return channel.inner if isinstance(channel, LinkEmulator) else channel
