"""`InProcessChannel`: two endpoints in one process (workers sharing a process or one GPU).

No framing and no copies for tensors: `send(tensor)` hands the flat uint8 view of the tensor
itself to the other endpoint (CUDA tensors stay on their device; the sender gives up the right
to modify it). Python byte objects are copied once into a CPU tensor. Thread-safe.

If the two sides use different CUDA streams, the sender must make the receiver's stream wait
for the producing stream (or synchronize) before the receiver reads the tensor.

Two processes on one GPU use transfer/cuda_ipc.py instead. `InProcessHostChannel` is the same
pair declared host-only (KV goes as host bytes).
"""

from __future__ import annotations

import threading

import torch

from zipserve.transfer.channel import (
    Buffer,
    Channel,
    TransferClosed,
    as_byte_tensor,
    check_tag,
)
from zipserve.transfer.mailbox import Mailbox


class InProcessChannel(Channel):
    path = "in_process"
    carries_device_tensors = True

    def __init__(self, inbox: Mailbox, outbox: Mailbox) -> None:
        super().__init__()
        self._inbox, self._outbox = inbox, outbox
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def pair(cls) -> tuple[InProcessChannel, InProcessChannel]:
        """Two connected endpoints: what a sends, b receives, and the other way round."""
        ab, ba = Mailbox(), Mailbox()
        return cls(inbox=ba, outbox=ab), cls(inbox=ab, outbox=ba)

    def send(self, buf: Buffer, tag: int) -> None:
        check_tag(tag)
        if self._closed:
            raise TransferClosed("send on a closed channel")
        msg = as_byte_tensor(buf)
        self._outbox.put(tag, msg)
        self._count_sent(msg.numel())

    def recv(self, tag: int, timeout: float | None = None) -> torch.Tensor:
        check_tag(tag)
        if self._closed:
            raise TransferClosed("recv on a closed channel")
        msg = self._inbox.get(tag, timeout)
        self._count_received(msg.numel())
        return msg

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._outbox.close("the peer closed the channel")
        self._inbox.close("the channel was closed")


class InProcessHostChannel(InProcessChannel):
    """An in-process pair declared host-only: KV crosses it as host bytes, as over gloo (to
    measure or test the host path with both engines in one process)."""

    carries_device_tensors = False
