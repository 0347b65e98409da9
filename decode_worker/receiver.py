"""The decode worker's receive thread: takes layers off one KV channel and hands them over.

One thread per attached channel runs `receive_layers` until the worker stops or the channel
breaks. It only reads (a device layer's checksum is queued on the GPU, not awaited; see
transfer/kv_messages.py) and hands each layer to the step loop, which imports it
(decode_worker/arrivals.py says why the import is not done here). What it reports back goes
through the callbacks in `ReceiveHooks`, so the worker keeps its locks and counters to itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from zipserve.compress.wire import DeviceLayerKV, LayerKV
from zipserve.decode_worker.step_trace import ReceiveTrace
from zipserve.transfer.channel import Channel, TransferError, TransferTimeout
from zipserve.transfer.kv_messages import recv_layer

RECV_POLL_S = 0.2
"""How long one wait on the channel lasts before the thread looks at the stop flag again."""


@dataclass(frozen=True)
class ReceiveHooks:
    """What a receive thread tells its worker."""

    arrive: Callable[[LayerKV | DeviceLayerKV, float | None], float]
    """Hand over a layer (and when its first message came off the channel, time.time);
    returns the hand-over time."""
    lost: Callable[[TransferError], None]
    """The channel broke or closed (TransferClosed is a TransferError); the thread ends."""
    unreadable: Callable[[], None]
    """A message that is no layer: no request to blame, the thread goes on."""


def receive_layers(
    channel: Channel, tag: int, stop: threading.Event, hooks: ReceiveHooks, trace: ReceiveTrace
) -> None:
    """Receive layers of `tag` from `channel` until `stop` is set or the channel breaks; each
    hand-over is recorded in `trace` (idle time before it, the thread's CPU time, the
    receive's own timings)."""
    handed_s = time.time()  # the last hand-over (the receive trace's idle_ms)
    cpu_s = time.thread_time()  # the thread's CPU time then (the receive trace's cpu_ms)
    while not stop.is_set():
        timing: dict[str, float] = {}
        try:  # host bytes or a device buffer (transfer/kv_messages.py)
            kv = recv_layer(channel, tag, timeout=RECV_POLL_S, timing=timing)
        except TransferTimeout:
            continue
        except TransferError as e:  # closed, or the transport broke (peer died, corrupt frame)
            hooks.lost(e)
            return
        except ValueError:  # unreadable
            hooks.unreadable()
            continue
        now = hooks.arrive(kv, timing.get("header_s"))
        cpu_now = time.thread_time()
        trace.handed_over(kv.layer, kv.nbytes(), timing, handed_s, now, 1e3 * (cpu_now - cpu_s))
        handed_s, cpu_s = now, cpu_now
