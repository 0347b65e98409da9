"""The decode worker's queue of received layers: the receive threads put, the step loop takes.

Layers wait here for the step loop instead of being imported by the receive thread: importing
there contended for the worker lock with the decode steps (Python locks are not fair), and under
load each of a request's layers waited about a step for it (the transfer phase grew to seconds).
The step loop imports them before each step and, on a GPU, while the step runs (it polls every
IMPORT_POLL_S while its tokens are on the way; ZIPSERVE_IMPORT_DURING_STEP=0 turns that off).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from zipserve.compress.wire import DeviceLayerKV, LayerKV

IMPORT_POLL_S = 1e-4
"""While a step runs on the GPU and some request waits for KV, the step loop checks for arrived
layers and for the step's end this often."""
IMPORT_DURING_STEP_ENV = "ZIPSERVE_IMPORT_DURING_STEP"
"""`0`: import only between steps (the behaviour before session 19, for A/B runs)."""


def import_during_step(value: str | None = None) -> bool:
    """The IMPORT_DURING_STEP_ENV switch (value: instead of the environment): on unless `0`.
    Raises ValueError naming the variable for anything but empty, 0 or 1."""
    raw = (os.environ.get(IMPORT_DURING_STEP_ENV, "") if value is None else value).strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{IMPORT_DURING_STEP_ENV}: expected 0 or 1, got {raw!r}")
    return raw != "0"


class Arrival(NamedTuple):
    """A received layer waiting for the step loop."""

    arrived_s: float
    """When the receive thread handed it over (time.time)."""
    received_s: float
    """When its first message came off the channel."""
    kv: LayerKV | DeviceLayerKV


class ArrivalQueue:
    """Received layers in arrival order, and the event that wakes the step loop when one comes
    (or when anything else gives it work: `wake`). One putter per channel, one taker."""

    def __init__(self) -> None:
        self._items: collections.deque[Arrival] = collections.deque()
        self._woken = threading.Event()

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Arrival:
        return self._items[i]

    def put(self, kv: LayerKV | DeviceLayerKV, received_s: float | None = None) -> float:
        """Queue a layer (received_s: when its first message came off the channel; default
        now) and wake the step loop. Returns the hand-over time."""
        now = time.time()
        self._items.append(Arrival(now, now if received_s is None else received_s, kv))
        self._woken.set()
        return now

    def take(self, ready: Callable[[LayerKV | DeviceLayerKV], bool]) -> list[Arrival]:
        """Every queued layer for which ready(kv), in order; the others stay, in order, ahead of
        any that arrive meanwhile."""
        taken, kept = [], []
        while self._items:
            arrival = self._items.popleft()
            (taken if ready(arrival.kv) else kept).append(arrival)
        self._items.extendleft(reversed(kept))
        return taken

    def drain(self) -> list[LayerKV | DeviceLayerKV]:
        """Empty the queue (at shutdown: what was never imported)."""
        out = []
        while self._items:
            out.append(self._items.popleft().kv)
        return out

    def wake(self) -> None:
        self._woken.set()

    def wait(self, timeout: float) -> bool:
        """Sleep until woken or `timeout` s passed; True (and reset) if woken."""
        if self._woken.wait(timeout):
            self._woken.clear()
            return True
        return False
