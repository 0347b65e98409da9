"""`SendTrace`: the prefill worker's opt-in CSV trace of its KV sends, for finding where a
request's transfer phase goes when the layers leave late (the sending part of the phase: from
the end of the forward pass until the last layer left).

One row per layer the sender thread sent: the request, the layer, its bytes, when the forward
pass handed it over (`queued_s`, epoch seconds) and when the sender thread took it (`taken_s`:
later than queued_s while the thread was busy with earlier layers, or waited for the GIL), then
the four parts of sending it: `ready_ms` (a device layer: waiting for its gather and the
checksum on the GPU; a host layer: serialising it), `ack_ms` (the channel's wait for the
receiver to give buffers back, CUDA IPC's in-flight limit), `export_ms` (CUDA IPC: exporting
the buffer's handle and event for the peer) and `send_ms` (the rest of the channel's sends: the
messages themselves), and `cpu_ms`: the CPU time the sender thread used for all of it (far
below the four's sum: it waited, for the GPU, the peer or the GIL; close to it: the host work
itself is slow). One more row per request, layer -1, marks its forward pass's end: queued_s is
when the forward pass returned, taken_s when the thread got to it and send_ms how long the
channel's flush took (a shaped link).

Off unless ZIPSERVE_STEP_TRACE names a folder (control/csv_trace.py); each prefill worker then
writes `<folder>/prefill_send_<tag>_<pid>.csv` (the tag: its codec), flushed after every
request. `python3 -m zipserve.bench.step_gaps` reads it beside the decode worker's traces.
"""

from __future__ import annotations

import os

from zipserve.control.csv_trace import CsvTrace

SEND_FIELDS = (
    "request_id",
    "layer",
    "nbytes",
    "queued_s",
    "taken_s",
    "ready_ms",
    "ack_ms",
    "export_ms",
    "send_ms",
    "cpu_ms",
)
END_LAYER = -1
"""The layer of the row that marks a request's forward-pass end."""


class SendTrace(CsvTrace):
    def __init__(self, folder: str | os.PathLike | None = None, tag: str = ""):
        super().__init__("prefill_send", SEND_FIELDS, folder, tag)

    def sent(
        self,
        request_id: str,
        layer: int,
        nbytes: int,
        queued_s: float,
        taken_s: float,
        ready_ms: float,
        ack_ms: float,
        send_ms: float,
        cpu_ms: float = 0.0,
        export_ms: float = 0.0,
    ) -> None:
        """Record one layer sent (layer END_LAYER: the request's forward-pass end, its flush
        in send_ms)."""
        self._add(
            (
                request_id,
                layer,
                nbytes,
                f"{queued_s:.6f}",
                f"{taken_s:.6f}",
                f"{ready_ms:.3f}",
                f"{ack_ms:.3f}",
                f"{export_ms:.3f}",
                f"{send_ms:.3f}",
                f"{cpu_ms:.3f}",
            )
        )
