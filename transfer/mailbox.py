"""`Mailbox`: thread-safe per-tag FIFO queues of received messages, with close/failure state.

Receiving channels put whole messages in; `get(tag, timeout)` takes the oldest message of a tag.
Once the mailbox is closed (the peer closed) or failed (the transport broke), a `get` on an
empty tag raises instead of waiting; messages already queued can still be taken.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from zipserve.transfer.channel import TransferClosed, TransferError, TransferTimeout


class Mailbox:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[int, deque[torch.Tensor]] = {}
        self._closed_reason: str | None = None
        self._error: BaseException | None = None

    def put(self, tag: int, msg: torch.Tensor) -> None:
        with self._cond:
            if self._closed_reason is not None or self._error is not None:
                raise TransferClosed(f"cannot deliver to a closed mailbox ({self._closed_reason})")
            self._queues.setdefault(tag, deque()).append(msg)
            self._cond.notify_all()

    def close(self, reason: str) -> None:
        """No more messages will come; waiting getters wake up and raise TransferClosed."""
        with self._cond:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The transport broke; waiting getters wake up and raise TransferError."""
        with self._cond:
            if self._error is None and self._closed_reason is None:
                self._error = error
            self._cond.notify_all()

    def pending(self, tag: int) -> int:
        with self._cond:
            return len(self._queues.get(tag, ()))

    def get(self, tag: int, timeout: float | None) -> torch.Tensor:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                q = self._queues.get(tag)
                if q:
                    msg = q.popleft()
                    if not q:
                        del self._queues[tag]
                    return msg
                if self._error is not None:
                    raise TransferError(f"transport failed: {self._error}") from self._error
                if self._closed_reason is not None:
                    raise TransferClosed(f"no message with tag {tag}: {self._closed_reason}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TransferTimeout(f"no message with tag {tag} within {timeout:.3g} s")
                self._cond.wait(left)
