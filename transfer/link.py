"""`LinkEmulator`: shapes any Channel's sends like a link of given bandwidth and latency.

The link is one shared resource: each send reserves the next free slot of
bytes * 8 / (gbps * 1e9) seconds on it (a busy-until timestamp, so concurrent or back-to-back
sends queue behind each other like on a real wire) and returns, as a post to a NIC's queue
does; a courier thread hands each message to the wrapped channel once its slot has ended (plus
the latency), in slot order. Off by default (no bandwidth limit, no latency): then send passes
straight through. Receives are not shaped. `flush()` waits until every message was handed over
and raises what a hand-off raised; the sender calls it at the end of each prompt.

A hand-off (CUDA-IPC export, a gloo send) takes time the wire does not: while the courier hands
message i over, message i+1 is on the wire, as a real NIC carries the next message while the
receiver's software takes the last one. (Until session 13 the sender handed off after each slot
itself and the link sat idle meanwhile: 13-20% of bf16's 10 Gb/s runs on an H100.)
`LinkUsage.handoff` says how much of a window went to hand-offs, beside `busy`, and
`LinkUsage.ack_wait` how much the wrapped channel spent waiting for the receiver to give buffers
back (CUDA IPC's in-flight cap) rather than exporting and posting.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from dataclasses import astuple, dataclass

import torch

from zipserve.transfer.channel import Buffer, Channel, Lease, TransferClosed, TransferTimeout
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
        return LinkUsage(*(math.fsum(col) / len(got) for col in zip(*map(astuple, got))))


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
        # Messages whose slot is reserved, for the courier: (hand over at, buffer, tag, stream).
        self._parcels: queue.Queue[tuple[float, Buffer, int, object] | None] = queue.Queue()
        self._pending = 0  # reserved and not yet handed over
        self._handed = threading.Condition(self._lock)
        self._failed: BaseException | None = None  # the first hand-off that raised, unreported
        self._courier: threading.Thread | None = None
        self._stopped = False

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
        """Every message handed over and given back by the receiver, within timeout."""
        deadline = time.monotonic() + timeout
        if not self._all_handed(timeout):
            return False
        return self.inner.wait_acked(max(0.0, deadline - time.monotonic()))

    @property
    def enabled(self) -> bool:
        return self.gbps is not None or self.latency_ms > 0

    def transmit_seconds(self, nbytes: int) -> float:
        """Serialization time of nbytes on this link (0 when unlimited)."""
        return 0.0 if self.gbps is None else nbytes * 8 / (self.gbps * 1e9)

    def send(self, buf: Buffer, tag: int) -> None:
        """Reserve the message's slot and return; the courier hands it over when the slot ends.
        Raises what an earlier hand-off raised (once), TransferClosed after close/detach. A CUDA
        buffer is handed over on the stream current here (its producer's order, and where CUDA
        IPC records the event its receiver waits on)."""
        nbytes = (
            buf.numel() * buf.element_size()
            if isinstance(buf, torch.Tensor)
            else memoryview(buf).nbytes
        )
        if not self.enabled:
            self.inner.send(buf, tag)
            self._count_sent(nbytes)
            return
        self._raise_failure()
        stream = (
            torch.cuda.current_stream(buf.device)
            if isinstance(buf, torch.Tensor) and buf.is_cuda
            else None
        )
        tx = self.transmit_seconds(nbytes)
        with self._lock:
            if self._stopped:
                raise TransferClosed("send on a closed link")
            start = max(time.monotonic(), self._busy_until)
            self._busy_until = start + tx
            self._pending += 1
            self._parcels.put((self._busy_until + self.latency_ms / 1e3, buf, tag, stream))
            if self._courier is None:
                self._courier = threading.Thread(
                    target=self._deliver, name="link-courier", daemon=True
                )
                self._courier.start()
        self._busy.add(start, start + tx)
        self._count_sent(nbytes)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every reserved message was handed to the wrapped channel; raises what a
        hand-off raised since the last report, TransferTimeout when timeout runs out first."""
        if not self._all_handed(timeout):
            raise TransferTimeout(f"{self._pending} message(s) not handed over in {timeout} s")
        self._raise_failure()

    def _all_handed(self, timeout: float | None) -> bool:
        """Wait (at most timeout) until the courier has handed over every reserved message."""
        with self._lock:
            return self._handed.wait_for(lambda: self._pending == 0, timeout)

    def detach(self, timeout: float = 60.0) -> None:
        """Hand over what is reserved, stop the courier, leave the wrapped channel open (to be
        shaped anew: `PrefillWorker.set_link`). Sends on this emulator then raise. Raises what
        the last flush would have (a failed hand-off, or TransferTimeout after `timeout`), after
        the courier has stopped either way."""
        try:
            self.flush(timeout=timeout)
        finally:
            with self._lock:
                self._stopped = True
            self._parcels.put(None)

    def _deliver(self) -> None:
        while (parcel := self._parcels.get()) is not None:
            at, buf, tag, stream = parcel
            _sleep_until(at)
            t0 = time.monotonic()
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    self.inner.send(buf, tag)
            except BaseException as e:  # noqa: BLE001 - reported by the next send or flush
                with self._lock:
                    self._failed = self._failed or e
            finally:
                self._handoffs.add(t0, time.monotonic())
                with self._lock:
                    self._pending -= 1
                    self._handed.notify_all()

    def _raise_failure(self) -> None:
        with self._lock:
            failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    def recv(self, tag: int, timeout: float | None = None) -> torch.Tensor:
        msg = self.inner.recv(tag, timeout)
        self._count_received(msg.numel())
        return msg

    def close(self) -> None:
        with self._lock:
            self._stopped = True
        self._parcels.put(None)
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
