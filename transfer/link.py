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
them or not.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from zipserve.transfer.channel import Buffer, Channel, Lease


@dataclass(frozen=True)
class LinkUsage:
    """Fractions of a window: the link transmitting (`busy`), and hand-offs to the wrapped
    channel after a slot (`handoff`)."""

    busy: float
    handoff: float

    @staticmethod
    def mean(usages: list[LinkUsage | None]) -> LinkUsage | None:
        got = [u for u in usages if u is not None]
        if not got:
            return None
        return LinkUsage(
            sum(u.busy for u in got) / len(got), sum(u.handoff for u in got) / len(got)
        )


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
        self._history_s = history_s
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self._busy: deque[tuple[float, float]] = deque()  # (start, end) on time.monotonic()
        self._handoffs: deque[tuple[float, float]] = deque()  # inner.send calls after a slot

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
                now = time.monotonic()
                start = max(now, self._busy_until)
                self._busy_until = start + tx
                self._keep(self._busy, start, start + tx, now)
                done = self._busy_until + self.latency_ms / 1e3
            _sleep_until(done)
            t0 = time.monotonic()
            self.inner.send(buf, tag)
            with self._lock:
                self._keep(self._handoffs, t0, time.monotonic(), t0)
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
        return self._fraction(self._busy, window_s)

    def usage(self, window_s: float = 1.0) -> LinkUsage:
        """busy_fraction and the fraction spent handing messages to the wrapped channel."""
        return LinkUsage(
            self._fraction(self._busy, window_s), self._fraction(self._handoffs, window_s)
        )

    def _keep(
        self, spans: deque[tuple[float, float]], start: float, end: float, now: float
    ) -> None:
        """Record [start, end) in spans (when not empty) and drop the spans that ended before
        the history looks back from `now` (caller holds the lock)."""
        if end > start:
            spans.append((start, end))
        while spans and spans[0][1] < now - self._history_s:
            spans.popleft()

    def _fraction(self, spans: deque[tuple[float, float]], window_s: float) -> float:
        now = time.monotonic()
        lo = now - window_s
        with self._lock:
            covered = sum(max(0.0, min(e, now) - max(s, lo)) for s, e in spans)
        return min(1.0, covered / window_s) if window_s > 0 else 0.0


def _sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(left)


def unshaped(channel: Channel) -> Channel:
    """The transport under a LinkEmulator (the channel itself when it is not shaped)."""
    return channel.inner if isinstance(channel, LinkEmulator) else channel
