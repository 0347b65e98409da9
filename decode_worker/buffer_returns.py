"""BufferReturns: gives received device layers back to their senders off the step loop.

Giving a CUDA-IPC layer back (`kv_messages.done`) waits for the reads of it to finish, drops the
mapping and sends an acknowledgement over the control channel: about 2 ms a layer on an H100
shared with a prefill (session 14's step trace, `done_ms`), paid by the step loop between two
decode steps, and 32 times over when a whole request's layers import in one pass. Here the step
loop records an event after its imports and hands the layers over; one thread waits for the
event and gives them back, in order. With a ReturnTrace on, each batch leaves a row there.

The thread gives them back with a stream of its own, which never gets work, as its current
stream: dropping a mapping synchronizes the current stream twice (CudaIpcChannel's release, and
torch's deleter of a received CUDA-IPC storage, the second with the GIL held). On the default
stream, where the decode steps run, each give-back waited for the step queued meanwhile (session
26's H100 return trace: a batch took about a decode step to go back, 9 ms median, 42 p90), and
on a GPU time-sliced with a prefill a step takes 100-160 ms: the suspected cause of that run's
freezes of the whole decode process (its receive thread sat 136 ms on one layer, and the prefill
worker's send to it waited as long; runbook stage trace27 checks with the stall monitor). The
event is what orders the give-back after the imports' reads. A batch's acknowledgements go back
as one message per channel (transfer/cuda_ipc.py DeferredAcks).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

import torch

from zipserve.compress.wire import DeviceLayerKV, LayerKV
from zipserve.decode_worker.step_trace import ReturnTrace
from zipserve.transfer.cuda_ipc import DeferredAcks
from zipserve.transfer.kv_messages import done

log = logging.getLogger(__name__)
_Batch = tuple[
    "torch.cuda.Event | None", "torch.cuda.Stream | None", list[LayerKV | DeviceLayerKV], float
]
"""What the step loop hands over: (after the imports, the give-back stream, layers, when)."""


class BufferReturns:
    def __init__(self, name: str = "kv-returns", trace: ReturnTrace | None = None) -> None:
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self.failures = 0
        """Layers whose give-back raised (logged; the others still go back)."""
        self._trace = trace if trace is not None and trace.on else None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        """The give-backs' own idle stream per device (see the module docstring)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def give_back(self, layers: list[LayerKV | DeviceLayerKV], device: torch.device) -> None:
        """Return `layers` once the work queued so far on `device`'s current stream (their
        imports) has run; returns at once."""
        if not layers:
            return
        after = stream = None
        if device.type == "cuda":
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(device))
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
        self._queue.put((after, stream, layers, time.time()))

    def close(self, timeout: float = 10.0) -> None:
        """Give back everything handed over so far, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            after, stream, layers, handed_s = item
            nbytes = sum(kv.nbytes() for kv in layers if isinstance(kv, DeviceLayerKV))
            t0 = time.perf_counter()
            if after is not None:
                after.synchronize()  # the imports' reads are done
            gpu_wait_ms = 1e3 * (time.perf_counter() - t0)
            t1 = time.perf_counter()
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                with DeferredAcks() as acks:  # one acknowledgement per channel and batch
                    self._give_back_all(layers)
            release_ms = 1e3 * (time.perf_counter() - t1) - acks.send_ms
            if self._trace is not None:
                self._trace.returned(
                    handed_s,
                    gpu_wait_ms,
                    time.time(),
                    len(layers),
                    nbytes,
                    release_ms,
                    acks.send_ms,
                )

    def _give_back_all(self, layers: list[LayerKV | DeviceLayerKV]) -> None:
        for kv in layers:
            try:
                done(kv)
            except Exception as e:  # noqa: BLE001 - counted and logged; go on with the rest
                self.failures += 1
                log.warning("giving a received KV layer back failed: %s: %s", type(e).__name__, e)
