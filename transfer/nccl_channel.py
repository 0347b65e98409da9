"""`NcclChannel`: a one-way channel over our ctypes NCCL binding (transfer/nccl.py), sending on a
CUDA stream of its own instead of the process group's hidden ones.

Framing as everywhere: a 4 x int64 `Header` (on the device) then the payload bytes, both with
ncclSend/ncclRecv on `stream`. The sending endpoint blocks each send until NCCL finished it (at
most timeout_s; then the communicator is aborted and TransferTimeout raised). The receiving
endpoint keeps a receive posted from a background thread and files messages by tag in a
`Mailbox`; an idle wait for the next header is unbounded but ends on close(), a stalled payload
ends after timeout_s. Payloads arrive as device tensors the caller owns (after the channel's
stream finished writing them). close() sends a CLOSE header (sender) or aborts the communicator
(receiver with a posted receive), so neither side hangs when the other is gone.
"""

from __future__ import annotations

import threading
import time

import torch

from zipserve.transfer.channel import (
    CLOSE_TAG,
    Buffer,
    Channel,
    Header,
    TransferClosed,
    TransferError,
    TransferTimeout,
    as_byte_tensor,
    check_tag,
)
from zipserve.transfer.mailbox import Mailbox
from zipserve.transfer.nccl import NcclComm, NcclError


class NcclChannel(Channel):
    path = "nccl_ctypes"
    carries_device_tensors = True

    def __init__(self, comm: NcclComm, peer: int, direction: str, timeout_s: float = 60.0):
        """comm: a communicator this endpoint owns (closed with it). direction: "send" or
        "recv" (NCCL point-to-point on one stream: one direction per endpoint)."""
        super().__init__()
        if direction not in ("send", "recv"):
            raise ValueError(f"direction must be 'send' or 'recv', got {direction!r}")
        self.comm, self.peer, self.direction, self.timeout_s = comm, peer, direction, timeout_s
        self.device = comm.device
        self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()
        self._mailbox = Mailbox()
        self._closed = self._broken = False
        self._stop = threading.Event()
        self._thread = None
        if direction == "recv":
            self._thread = threading.Thread(
                target=self._receive_loop, daemon=True, name="nccl-recv"
            )
            self._thread.start()

    # -- sending ----------------------------------------------------------------------------
    def send(self, buf: Buffer, tag: int) -> None:
        check_tag(tag)
        self._send(as_byte_tensor(buf), tag)

    def _send(self, payload: torch.Tensor, tag: int, timeout_s: float | None = None) -> None:
        if self.direction != "send":
            raise TransferError("this NCCL endpoint only receives")
        with self._lock:
            if self._closed or self._broken:
                raise TransferClosed("send on a closed or broken NCCL channel")
            torch.cuda.set_device(self.device)  # this thread enqueues on the comm's device
            payload = payload.to(self.device)
            hdr = Header(payload.numel(), tag).to_tensor().to(self.device)  # [4] int64
            try:
                self.comm.send(hdr, self.peer, self.stream)
                if payload.numel():
                    self.comm.send(payload, self.peer, self.stream)
                self._wait(self.timeout_s if timeout_s is None else timeout_s, None)
            except TransferError:
                self._broken = True
                raise
            except (NcclError, RuntimeError) as e:
                self._broken = True
                raise TransferError(f"NCCL send to rank {self.peer} failed: {e}") from e
        if tag != CLOSE_TAG:
            self._count_sent(payload.numel())

    # -- receiving --------------------------------------------------------------------------
    def recv(self, tag: int, timeout: float | None = None) -> torch.Tensor:
        check_tag(tag)
        if self.direction != "recv":
            raise TransferError("this NCCL endpoint only sends")
        if self._closed:
            raise TransferClosed("recv on a closed channel")
        msg = self._mailbox.get(tag, timeout)
        self._count_received(msg.numel())
        return msg

    def _receive_loop(self) -> None:
        torch.cuda.set_device(self.device)
        try:
            while not self._stop.is_set():
                hdr = torch.empty(Header.NUM_WORDS, dtype=torch.int64, device=self.device)
                self.comm.recv(hdr, self.peer, self.stream)
                if not self._wait(None, self._stop):
                    return
                h = Header.from_tensor(hdr)
                if h.tag == CLOSE_TAG:
                    self._mailbox.close(f"rank {self.peer} closed the channel")
                    return
                payload = torch.empty(h.length, dtype=torch.uint8, device=self.device)
                if h.length:
                    self.comm.recv(payload, self.peer, self.stream)
                    if not self._wait(self.timeout_s, self._stop):
                        return
                self._mailbox.put(h.tag, payload)
        except Exception as e:
            if self._stop.is_set():
                self._mailbox.close("the channel was closed")
            else:
                self._mailbox.fail(e)

    def _wait(self, timeout_s: float | None, stop: threading.Event | None) -> bool:
        """Until the stream's queued NCCL work is done (True); False when stop was set.
        Raises TransferTimeout (communicator aborted) after timeout_s, TransferError on an
        asynchronous NCCL error."""
        done = torch.cuda.Event()
        done.record(self.stream)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pause = 0.0
        while not done.query():
            if stop is not None and stop.is_set():
                return False
            err = self.comm.async_error()
            if err is not None:
                raise TransferError(f"NCCL error with rank {self.peer}: {err}")
            if deadline is not None and time.monotonic() > deadline:
                self.comm.abort()
                raise TransferTimeout(
                    f"NCCL transfer with rank {self.peer} did not finish within {timeout_s} s"
                )
            time.sleep(pause)
            pause = min(1e-3, pause * 2 + 1e-5)
        return True

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        if self.direction == "send" and not self._broken:
            try:
                self._send(
                    torch.empty(0, dtype=torch.uint8), CLOSE_TAG, timeout_s=min(self.timeout_s, 5.0)
                )
            except TransferError:
                pass  # the peer is gone: abort below
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._mailbox.close("the channel was closed")
        try:
            receiving = self._thread is not None and (
                self._thread.is_alive() or not self.stream.query()
            )
            if receiving or self._broken:
                self.comm.abort()  # a posted receive would never complete
            else:
                self.comm.destroy()
        except NcclError:
            pass  # teardown is best effort
