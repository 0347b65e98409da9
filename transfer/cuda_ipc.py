"""`CudaIpcChannel`: two processes on ONE GPU (e.g. Ray actors with fractional GPUs) pass device
buffers through CUDA IPC handles; only a small JSON control message crosses a host channel.

Sending a CUDA tensor: torch's own IPC machinery (`torch.multiprocessing.reductions.
reduce_tensor`) exports the allocation it lives in (cudaIpcMemHandle + offset + torch's shared
ref counter + an event the producer recorded after writing it); we turn those arguments into JSON
and send them over the `control` channel (gloo process group, or anything else carrying bytes).
The receiver rebuilds the tensor (`rebuild_cuda_tensor`: maps the allocation, waits for the
producer's event on a stream of its own, so no other work of its queues behind that wait), reads
it device-to-device (`recv_lease`: straight into its page pool), then `release()`s the lease: the
mapping is dropped and an ACK goes back. The producer's event is recorded in its current stream
at send time: send from a stream ordered after the writes and little else
(DeviceLayerKV.sending). Python byte objects (and CPU tensors) travel inline on the control
channel.

Lifetime: the sender keeps every shared tensor referenced until its ACK arrives, so the caching
allocator cannot hand the memory to someone else while the peer may read it; in addition torch's
IPC ref counter keeps a block whose mapping is still open in "limbo" instead of reusing it. Waits
are bounded: more than `max_inflight_bytes` unacknowledged blocks `send` at most `ack_timeout_s`;
an ACK missing for `ack_timeout_s` (peer stuck) or a dead control channel (peer gone) fails the
channel (the next send raises TransferTimeout / TransferClosed) and drops the sender's references
(torch's limbo still guards memory the dead peer mapped). close() releases open leases and waits
at most a few seconds for outstanding ACKs.

Mappings kept (`keep_mapped`, off by default; $ZIPSERVE_IPC_KEEP_MAPPED=1 turns it on for the
channels transports.py opens): torch maps a peer's whole allocation segment per handle and unmaps
it when the last tensor received from that segment dies, so with one lease at a time every layer
paid a cudaIpcOpenMemHandle on the receive thread (0.5-0.8 ms) and a cudaIpcCloseMemHandle on the
give-back (session 27's H200 trace: 2.5-4.5 ms a layer given back, acknowledgement included).
With it, the receiver keeps the latest tensor of each segment after its lease is given back
(at most KEEP_MAPPED_SEGMENTS segments and KEEP_MAPPED_BYTES of kept tensors, the least recently
used go first): the segment stays mapped and the next layer from it maps for free. It pays only
where a segment holds several blocks: torch's allocator serves 1-10 MB requests (a compressed
8k-token layer) from 20 MB segments, but usually gives a bf16 layer (32 MiB at 8k tokens) a
segment of its own, and no later tensor can come from a segment whose only block is kept. The cost: the
sender's block behind each kept tensor stays in torch's IPC limbo (not reusable by the sender)
until a later tensor of its segment replaces it; hence the byte bound.

`exporter` / `importer` are injectable so the bookkeeping is testable on CPU with fakes.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zipserve.compress.wire import DTYPES
from zipserve.transfer.channel import (
    Buffer,
    Channel,
    Lease,
    TransferClosed,
    TransferError,
    TransferTimeout,
    as_byte_tensor,
    check_tag,
)
from zipserve.transfer.spans import SpanLog

ACK_TAG = 0
"""Control tag of acknowledgements; user tag t travels as control tag t + 1."""
_INLINE, _HANDLE = b"B", b"H"
KEEP_MAPPED_ENV = "ZIPSERVE_IPC_KEEP_MAPPED"
KEEP_MAPPED_SEGMENTS = 64
"""Segments a keep_mapped receiver holds mapped at most (the least recently used goes)."""
KEEP_MAPPED_BYTES = 256 << 20
"""Bytes of kept tensors at most: the sender memory they hold out of reuse."""
_deferring = threading.local()
"""Per thread: the DeferredAcks collecting acknowledgements, while one is open."""


class DeferredAcks:
    """Acknowledgements of the leases released in this thread inside `with DeferredAcks():`
    go back as one control message per channel when the block ends, instead of one per lease.
    Each acknowledgement is a control-channel send that meets the peer's acknowledgement loop
    (a rendezvous on gloo): giving back a request's 32 layers cost 32 of them, 2.5-4.5 ms a
    layer on session 27's H200 trace. `send_ms`: how long the sends at the end took."""

    def __init__(self) -> None:
        self._ids: dict[int, tuple[CudaIpcChannel, list[int]]] = {}
        self.send_ms = 0.0

    def __enter__(self) -> DeferredAcks:
        if getattr(_deferring, "acks", None) is not None:
            raise RuntimeError("DeferredAcks blocks do not nest")
        _deferring.acks = self
        return self

    def add(self, channel: CudaIpcChannel, mid: int) -> None:
        self._ids.setdefault(id(channel), (channel, []))[1].append(mid)

    def __exit__(self, *exc) -> None:
        _deferring.acks = None
        t0 = time.perf_counter()
        for channel, ids in self._ids.values():
            channel._send_acks(ids)
        self._ids.clear()
        self.send_ms = 1e3 * (time.perf_counter() - t0)


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(bytes(b)).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


def export_handle(t: torch.Tensor) -> dict:
    """torch's IPC export of a CUDA tensor (reduce_tensor) as a JSON-able dict."""
    from torch.multiprocessing.reductions import reduce_tensor

    (
        _,
        (
            tensor_cls,
            size,
            stride,
            offset,
            storage_cls,
            dtype,
            device,
            handle,
            storage_bytes,
            storage_offset,
            _,
            ref_counter,
            ref_counter_offset,
            event,
            event_sync,
        ),
    ) = reduce_tensor(t)
    return {
        "size": list(size),
        "stride": list(stride),
        "offset": int(offset),
        "storage": storage_cls.__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "device": int(device),
        "handle": _b64(handle),
        "storage_bytes": int(storage_bytes),
        "storage_offset": int(storage_offset),
        "ref_counter": _b64(ref_counter),
        "ref_counter_offset": int(ref_counter_offset),
        "event": _b64(event),
        "event_sync": bool(event_sync),
    }


def open_handle(h: dict, device: int | None = None) -> torch.Tensor:
    """Map an exported tensor in this process (rebuild_cuda_tensor). device: this process's
    index of the same GPU (default: the sender's index)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    storage_cls = {
        "TypedStorage": torch.storage.TypedStorage,
        "UntypedStorage": torch.UntypedStorage,
    }[h["storage"]]
    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(h["size"]),
        tuple(h["stride"]),
        h["offset"],
        storage_cls,
        DTYPES[h["dtype"]],
        h["device"] if device is None else device,
        _unb64(h["handle"]),
        h["storage_bytes"],
        h["storage_offset"],
        False,
        _unb64(h["ref_counter"]),
        h["ref_counter_offset"],
        _unb64(h["event"]),
        h["event_sync"],
    )


@dataclass
class _Sent:
    tensor: torch.Tensor
    nbytes: int
    at: float


class CudaIpcChannel(Channel):
    path = "cuda_ipc"
    carries_device_tensors = True
    leases = True
    acknowledges = True

    def __init__(
        self,
        control: Channel,
        device: torch.device | str | int | None = None,
        *,
        ack_timeout_s: float = 30.0,
        max_inflight_bytes: int = 8 << 30,
        exporter: Callable[[torch.Tensor], dict] = export_handle,
        importer: Callable[..., torch.Tensor] = open_handle,
        inline_cpu: bool = True,
        keep_mapped: bool = False,
    ) -> None:
        """control: a connected host channel to the peer (user tags t -> t + 1, ACKs on 0).
        device: this side's CUDA device of the shared GPU. inline_cpu: CPU tensors travel
        inline (False: through exporter too, for tests with fake exporters). keep_mapped: keep
        each sender segment mapped between messages (the module docstring says how)."""
        super().__init__()
        if ack_timeout_s <= 0 or max_inflight_bytes <= 0:
            raise ValueError("ack_timeout_s and max_inflight_bytes must be positive")
        self.control = control
        """The host channel under it (inline bytes, handles, ACKs)."""
        self.device = (
            None
            if device is None
            else (torch.device("cuda", device) if isinstance(device, int) else torch.device(device))
        )
        self.ack_timeout_s, self.max_inflight_bytes = ack_timeout_s, max_inflight_bytes
        self._export, self._import, self._inline_cpu = exporter, importer, inline_cpu
        self._stream: torch.cuda.Stream | None = None
        """Where received handles are mapped (CUDA devices; made on first use)."""
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._inflight: dict[int, _Sent] = {}
        self._inflight_bytes = 0
        self._ack_waits = SpanLog()  # sends waiting for the receiver's acknowledgements
        self._leases: dict[int, Lease] = {}
        self.keep_mapped = keep_mapped
        self._mapped: dict[str, torch.Tensor] = {}
        """keep_mapped: the latest tensor given back per sender segment (handle), oldest first."""
        self._failure: TransferError | None = None
        self._closed = False
        self._stop = threading.Event()
        self._acks = threading.Thread(target=self._ack_loop, daemon=True, name="ipc-acks")
        self._acks.start()

    # -- sending ----------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        """Shared buffers not yet acknowledged."""
        with self._cond:
            return len(self._inflight)

    def send(self, buf: Buffer, tag: int) -> None:
        check_tag(tag)
        t = as_byte_tensor(buf)
        if not isinstance(buf, torch.Tensor) or (t.device.type == "cpu" and self._inline_cpu):
            self._check_usable()
            self.control.send(_INLINE + bytes(t.cpu().numpy()), tag + 1)
            self._count_sent(t.numel())
            return
        nbytes = t.numel()
        with self._cond:
            t0 = time.monotonic()
            deadline = t0 + self.ack_timeout_s
            waited = False
            try:
                while self._inflight and self._inflight_bytes + nbytes > self.max_inflight_bytes:
                    self._check_usable()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransferTimeout(
                            f"{len(self._inflight)} shared buffers "
                            f"({self._inflight_bytes} bytes) unacknowledged for "
                            f"{self.ack_timeout_s} s"
                        )
                    waited = True
                    self._cond.wait(left)
            finally:
                if waited:  # a send that found room at once records no span
                    t1 = time.monotonic()
                    self._ack_waits.add(t0, t1)
                    self._count_ack_wait(t1 - t0)
            self._check_usable()
            mid = next(self._ids)
            self._inflight[mid] = _Sent(t, nbytes, time.monotonic())
            self._inflight_bytes += nbytes
        try:
            t0 = time.perf_counter()
            handle = self._export(t)
            self._count_export(time.perf_counter() - t0)
            self.control.send(
                _HANDLE + json.dumps({"id": mid, "nbytes": nbytes, "handle": handle}).encode(),
                tag + 1,
            )
        except Exception as e:
            self._forget(mid)
            if isinstance(e, TransferError):
                raise
            raise TransferError(f"cannot share a {nbytes}-byte buffer over CUDA IPC: {e}") from e
        self._count_sent(nbytes)

    def limit_inflight(self, nbytes: int) -> None:
        """Sends wait (at most ack_timeout_s) while more than nbytes are unacknowledged."""
        if nbytes <= 0:
            raise ValueError(f"max_inflight_bytes must be positive, got {nbytes}")
        with self._cond:
            self.max_inflight_bytes = nbytes

    def ack_wait_fraction(self, window_s: float) -> float:
        return self._ack_waits.fraction(window_s)

    def wait_acked(self, timeout: float) -> bool:
        """Block until every shared buffer is acknowledged (True) or timeout (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not self._inflight

    def _forget(self, *mids: int) -> None:
        with self._cond:
            for mid in mids:
                sent = self._inflight.pop(mid, None)
                if sent is not None:
                    self._inflight_bytes -= sent.nbytes
            self._cond.notify_all()

    def _fail(self, error: TransferError) -> None:
        """Peer gone or stuck: drop every reference (torch's IPC limbo guards open mappings)."""
        with self._cond:
            if self._failure is None:
                self._failure = error
            self._inflight.clear()
            self._inflight_bytes = 0
            self._cond.notify_all()

    def _check_usable(self) -> None:
        if self._closed:
            raise TransferClosed("send on a closed channel")
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))

    def _ack_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.control.recv(ACK_TAG, timeout=0.05)
            except TransferTimeout:
                self._expire()
                continue
            except TransferClosed as e:
                self._fail(TransferClosed(f"the peer closed the channel ({e})"))
                return
            except TransferError as e:
                self._fail(TransferError(f"control channel failed: {e}"))
                return
            try:
                ack = json.loads(bytes(msg.numpy()))
                ids = [int(i) for i in ack["ids"]] if "ids" in ack else [int(ack["id"])]
            except (ValueError, KeyError, TypeError):
                self._fail(TransferError("malformed acknowledgement from the peer"))
                return
            self._forget(*ids)

    def _expire(self) -> None:
        with self._cond:
            now = time.monotonic()
            late = [mid for mid, s in self._inflight.items() if now - s.at > self.ack_timeout_s]
        if late:
            self._fail(
                TransferTimeout(
                    f"the peer did not return {len(late)} shared buffer(s) "
                    f"within {self.ack_timeout_s} s"
                )
            )

    # -- receiving --------------------------------------------------------------------------
    def recv_lease(self, tag: int, timeout: float | None = None) -> Lease:
        """The next message of this tag, mapped in place (device messages) or inline bytes.
        The sender's buffer stays reserved until lease.release()."""
        check_tag(tag)
        if self._closed:
            raise TransferClosed("recv on a closed channel")
        msg = self.control.recv(tag + 1, timeout)
        kind, body = bytes(msg[:1].numpy()), msg[1:]
        if kind == _INLINE:
            self._count_received(body.numel())
            return Lease(body)
        if kind != _HANDLE:
            raise TransferError(f"unknown CUDA-IPC control message kind {kind!r}")
        info = json.loads(bytes(body.numpy()))
        t0 = time.perf_counter()
        try:
            args = (info["handle"],) if self.device is None else (info["handle"], self.device.index)
            tensor, ready = self._import_mapped(*args)
        except Exception as e:
            self._send_acks([info["id"]])  # nothing mapped: the sender may reuse the buffer
            raise TransferError(f"cannot map the peer's buffer: {e}") from e
        lease = Lease(tensor, ready=ready, map_ms=1e3 * (time.perf_counter() - t0))
        segment = info["handle"].get("handle") if self.keep_mapped else None
        lease._release = lambda: self._give_back(info["id"], lease, segment)
        with self._cond:
            self._leases[info["id"]] = lease
        self._count_received(int(info["nbytes"]))
        return lease

    def _import_mapped(self, *args) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Map the peer's buffer; returns it with an event that completes once the peer's
        writes to it are done (None off CUDA). The mapping makes the current stream wait for
        the sender's event: on the stream the decode steps run on, every step queued after it
        would wait for the sender's GPU to get there (a whole prefill when the sender's event
        sits behind one), so it waits on a stream of its own. The host does not wait: a wait
        per message let this thread take one layer per decode step on a busy GPU (H100,
        session 14); readers order themselves after the event (Lease.ready)."""
        if self.device is None or self.device.type != "cuda":
            return self._import(*args), None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            tensor = self._import(*args)
            mapped = torch.cuda.Event()
            mapped.record(self._stream)
        return tensor, mapped

    def recv(self, tag: int, timeout: float | None = None) -> torch.Tensor:
        """A private copy (device-to-device for CUDA buffers); the mapping is returned at once."""
        lease = self.recv_lease(tag, timeout)
        try:
            if lease.ready is not None:
                torch.cuda.current_stream(lease.tensor.device).wait_event(lease.ready)
            return lease.tensor.clone()
        finally:
            lease.release()

    @property
    def open_leases(self) -> int:
        with self._cond:
            return len(self._leases)

    def _give_back(self, mid: int, lease: Lease, segment: str | None = None) -> None:
        t, lease.tensor = lease.tensor, None
        if t is not None and t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()  # our reads of it are done
        if segment is not None and t is not None:
            self._keep(segment, t)
        del t  # drops the mapping (torch's IPC ref counter goes down), unless kept
        with self._cond:
            self._leases.pop(mid, None)
        deferred = getattr(_deferring, "acks", None)
        if deferred is not None:
            deferred.add(self, mid)
        else:
            self._send_acks([mid])

    def _keep(self, segment: str, t: torch.Tensor) -> None:
        """Hold t so its segment stays mapped; the tensor it replaces (the segment's previous
        one, or the least recently used ones beyond KEEP_MAPPED_SEGMENTS / KEEP_MAPPED_BYTES)
        is let go. A tensor larger than KEEP_MAPPED_BYTES alone is not kept."""
        with self._cond:
            self._mapped.pop(segment, None)
            self._mapped[segment] = t
            while len(self._mapped) > KEEP_MAPPED_SEGMENTS or (
                self._mapped and sum(x.nbytes for x in self._mapped.values()) > KEEP_MAPPED_BYTES
            ):
                self._mapped.pop(next(iter(self._mapped)))

    @property
    def kept_segments(self) -> int:
        """Sender segments held mapped between messages (keep_mapped)."""
        with self._cond:
            return len(self._mapped)

    def _send_acks(self, mids: list[int]) -> None:
        ack = {"id": mids[0]} if len(mids) == 1 else {"ids": mids}
        try:
            self.control.send(json.dumps(ack).encode(), ACK_TAG)
        except TransferError:
            pass  # the sender is gone: its own bookkeeping drops the buffer

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            leases = list(self._leases.values())
        for lease in leases:
            lease.release()
        with self._cond:
            self._mapped.clear()  # unmaps the kept segments
        self.wait_acked(min(self.ack_timeout_s, 5.0))
        with self._cond:
            self._closed = True
        self._stop.set()
        self._acks.join(timeout=2.0)
        self._fail(TransferClosed("the channel was closed"))
        self.control.close()
