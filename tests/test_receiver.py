"""decode_worker/receiver.py: the receive thread hands every layer over in order, counts what is
no layer and goes on, and ends (telling the worker why) when its channel closes."""

from __future__ import annotations

import csv
import threading
import time

from zipserve.compress.wire import LayerKV
from zipserve.decode_worker.receiver import ReceiveHooks, receive_layers
from zipserve.decode_worker.step_trace import ReceiveTrace
from zipserve.transfer.channel import TransferClosed, TransferError
from zipserve.transfer.inprocess import InProcessChannel

TAG = 7


def test_layers_are_handed_over_garbage_counted_and_a_close_ends_the_thread(tmp_path):
    sender, receiver = InProcessChannel.pair()
    got: list[tuple[int, str]] = []
    lost: list[TransferError] = []
    unreadable = []

    def arrive(kv, header_s: float | None) -> float:
        got.append((kv.layer, kv.request_id))
        return time.time()  # the hand-over

    hooks = ReceiveHooks(
        arrive=arrive,
        lost=lost.append,
        unreadable=lambda: unreadable.append(1),
    )
    trace = ReceiveTrace(tmp_path, tag="t")
    stop = threading.Event()
    thread = threading.Thread(target=receive_layers, args=(receiver, TAG, stop, hooks, trace))
    thread.start()
    sender.send(LayerKV(0, 3, b"", {}, "a").to_bytes(), TAG)
    sender.send(b"not a layer", TAG)
    sender.send(LayerKV(1, 3, b"", {}, "a").to_bytes(), TAG)
    sender.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert got == [(0, "a"), (1, "a")]
    assert len(unreadable) == 1
    assert len(lost) == 1 and isinstance(lost[0], TransferClosed)
    trace.flush()
    rows = list(csv.DictReader(trace.path.open()))
    assert [r["layer"] for r in rows] == ["0", "1"]  # one row per layer handed over


def test_stop_ends_an_idle_thread():
    _, receiver = InProcessChannel.pair()
    hooks = ReceiveHooks(arrive=lambda kv, s: 0.0, lost=lambda e: None, unreadable=lambda: None)
    stop = threading.Event()
    thread = threading.Thread(
        target=receive_layers, args=(receiver, TAG, stop, hooks, ReceiveTrace(None))
    )
    thread.start()
    stop.set()
    thread.join(timeout=5)  # one poll interval (0.2 s) at most
    assert not thread.is_alive()
