"""One layer's KV as channel messages, in the form the channel can carry best.

Host form (`LayerKV`, a ZKVL message: JSON header, CRC32-checked pages, raw tail); any channel.
Device form (`DeviceLayerKV`): two consecutive messages on the same tag, the small ZKVD header
(JSON with the device checksum) then the flat payload tensor, which never leaves the device on
channels whose `carries_device_tensors` is true (in-process: the same tensor; CUDA IPC: mapped by
the receiver; NCCL: device-to-device). The receiver tells the forms apart by the first message's
magic (compress/wire: every format, its framing and `decode`), so a decode worker takes either
from any prefill worker.

`use_device_form(channel, device)` is the automatic choice: the device form exactly when the KV
lives on a CUDA device and the channel carries device tensors; everything else (CPU, gloo) keeps
the host form.
"""

from __future__ import annotations

import threading
import time
import weakref

import torch

from zipserve.compress.wire import (
    DEVICE_HEADER,
    LAYER,
    DeviceLayerKV,
    FormatError,
    LayerKV,
    decode,
    format_of,
)
from zipserve.transfer.channel import Channel, TransferTimeout

PAYLOAD_TIMEOUT_S = 30.0
"""How long a receiver waits for the payload once a device header arrived."""

_send_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def use_device_form(channel: Channel, device: torch.device | str) -> bool:
    """The device form when the KV is on CUDA and the channel moves device tensors as such."""
    return torch.device(device).type == "cuda" and channel.carries_device_tensors


def _lock_for(channel: Channel) -> threading.Lock:
    with _locks_guard:
        lock = _send_locks.get(channel)
        if lock is None:
            lock = _send_locks[channel] = threading.Lock()
        return lock


def send_layer(
    channel: Channel,
    kv: LayerKV | DeviceLayerKV,
    tag: int,
    timing: dict[str, float] | None = None,
) -> int:
    """Send one layer; returns the payload bytes sent. A device-form layer keeps its two
    messages together (one sender at a time per channel). `timing`, when given, gets
    "ready_ms": making the message (a device layer: waiting for its gather and checksum; a
    host layer: serialising it) and "send_ms": the channel's sends after that."""
    t0 = time.perf_counter()
    if isinstance(kv, LayerKV):
        data = kv.to_bytes()
        t1 = time.perf_counter()
        channel.send(data, tag)
        sent = len(data)
    else:
        with kv.sending():  # not on the forward pass's stream (DeviceLayerKV.sending says why)
            header = kv.header_bytes()  # waits for the gather, computes the checksum value
            t1 = time.perf_counter()
            with _lock_for(channel):
                channel.send(header, tag)
                channel.send(kv.wire.payload, tag)
        sent = len(header) + kv.nbytes()
    if timing is not None:
        timing["ready_ms"] = 1e3 * (t1 - t0)
        timing["send_ms"] = 1e3 * (time.perf_counter() - t1)
    return sent


def recv_layer(
    channel: Channel,
    tag: int,
    timeout: float | None = None,
    payload_timeout: float = PAYLOAD_TIMEOUT_S,
    timing: dict[str, float] | None = None,
) -> LayerKV | DeviceLayerKV:
    """The next layer of this tag in whichever form it was sent. Raises the channel's
    TransferTimeout/TransferClosed/TransferError, and FormatError (a ValueError) for a message
    that is not a layer or a device header whose payload does not follow. Call `done(kv)` when
    finished with a received device layer (CUDA IPC returns the mapping to the sender then).
    A device layer's checksum is queued, not awaited: `settled(kv)` says when importing it will
    not wait for the GPU. `timing`, when given, gets "header_s": when the first message came
    off the channel (time.time), "payload_s": when a device layer's payload was in hand
    (mapped, for CUDA IPC), "map_ms": the mapping's share of that (0 unless CUDA IPC),
    "checksum_ms": queueing a device layer's checksum on the GPU (which should not wait)."""
    first = channel.recv(tag, timeout)
    if timing is not None:
        timing["header_s"] = time.time()
    data = first.cpu().numpy().tobytes()
    magic = format_of(data)
    if magic == LAYER:
        try:
            return decode(data)
        except Exception as e:  # every way it can be unreadable
            raise FormatError(f"unreadable LayerKV message: {e}") from e
    if magic != DEVICE_HEADER:
        raise FormatError("not a zipserve LayerKV message")
    header = data
    try:
        if channel.leases:  # CUDA IPC: map, import, then give back
            got = channel.recv_lease(tag, payload_timeout)
            payload, release, ready, map_ms = got.tensor, got.release, got.ready, got.map_ms
        else:
            payload, release, ready, map_ms = channel.recv(tag, payload_timeout), None, None, 0.0
    except TransferTimeout as e:
        raise FormatError(f"a device KV header arrived without its payload: {e}") from e
    if timing is not None:
        timing["payload_s"] = time.time()
        timing["map_ms"] = map_ms
    try:
        kv = DeviceLayerKV.from_header(header, payload, release)
    except Exception as e:
        if release is not None:
            release()
        raise FormatError(f"unreadable device LayerKV header: {e}") from e
    kv.ready = ready  # the mapping's readers wait for the sender's writes (None: done)
    t0 = time.perf_counter()
    kv.start_verify()  # queued here, read by import_layer (which refuses a mismatch)
    if timing is not None:
        timing["checksum_ms"] = 1e3 * (time.perf_counter() - t0)
    return kv


def settled(kv: LayerKV | DeviceLayerKV) -> bool:
    """True when importing kv will not wait for the GPU (its checksum has been computed);
    host layers always are."""
    return not isinstance(kv, DeviceLayerKV) or kv.settled()


def done(kv: LayerKV | DeviceLayerKV | None) -> None:
    """The receiver is finished with kv (returns a CUDA-IPC mapping; no-op otherwise)."""
    if isinstance(kv, DeviceLayerKV):
        kv.done()
