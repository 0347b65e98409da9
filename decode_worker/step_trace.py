"""Opt-in CSV traces of the decode worker, for finding where a request's time goes under load.

`StepTrace`: one row per pass of the step loop that did something: when it began (epoch
seconds), how long it spent importing arrived layers before the step, in the decode step (the
engine's step, which waits for its tokens; layers that arrived meanwhile are imported inside it,
while the GPU runs the step) and handing CUDA-IPC buffers to the thread that gives them back
(decode_worker/buffer_returns.py), how many layers it imported, how many sequences the step
decoded, how long the longest-waiting of those layers had been handed over before the pass took
it (`wait_ms`), and the longest any of them took the receive thread, from its first message to
its hand-over (`recv_ms`).

`ReceiveTrace`: one row per layer the receive thread took off a channel: when its first message
came off (`header_s`), how long the thread had waited for it since handing the previous layer
over (`idle_ms`: about 0 while messages queue up, i.e. the thread is the bottleneck), how long
the payload took after the header (`payload_ms`: waiting for it plus mapping it), the mapping's
own share (`map_ms`, CUDA IPC), the rest up to the hand-over (`verify_ms`: reading the header and
queueing the checksum), its size and layer, the checksum's queueing alone (`checksum_ms`: launches
that should not wait, unless something holds the GPU's queue or the GIL), and the thread's CPU
time since its previous hand-over (`cpu_ms`: waiting for a message costs next to none, so a
verify_ms far above it is a wait: for the GIL, a lock or the driver).

`ReturnTrace`: one row per batch of imported CUDA-IPC layers given back to their sender
(decode_worker/buffer_returns.py): when the step loop handed the batch over (`handed_s`), how
long the returning thread then waited for the GPU to finish the imports' reads (`gpu_wait_ms`:
they sit on the step's stream, behind the decode step queued before them), when the last
acknowledgement had gone (`returned_s`), the batch's layers and bytes, how long dropping their
mappings took (`release_ms`) and sending the batch's acknowledgements (`ack_ms`: one message per
channel). A sender whose in-flight
limit is reached waits for exactly these acknowledgements.

Off unless ZIPSERVE_STEP_TRACE names a folder (control/csv_trace.py); each worker process then
writes `<folder>/decode_steps_<tag>_<pid>.csv`, `<folder>/decode_recv_<tag>_<pid>.csv` and
`<folder>/decode_returns_<tag>_<pid>.csv` (the tag: the worker's codec; rows buffered, flushed
every FLUSH_ROWS and at shutdown). `python3 -m zipserve.bench.step_gaps` reads them.
"""

from __future__ import annotations

import os

from zipserve.control.csv_trace import ENV, CsvTrace

__all__ = [
    "ENV",
    "FIELDS",
    "RECV_FIELDS",
    "RETURN_FIELDS",
    "ReceiveTrace",
    "ReturnTrace",
    "StepTrace",
]

FIELDS = ("start_s", "import_ms", "layers", "step_ms", "batch", "done_ms", "wait_ms", "recv_ms")
RECV_FIELDS = (
    "header_s",
    "idle_ms",
    "payload_ms",
    "map_ms",
    "verify_ms",
    "nbytes",
    "layer",
    "checksum_ms",
    "cpu_ms",
)
RETURN_FIELDS = (
    "handed_s",
    "gpu_wait_ms",
    "returned_s",
    "layers",
    "nbytes",
    "release_ms",
    "ack_ms",
)


class StepTrace(CsvTrace):
    def __init__(self, folder: str | os.PathLike | None = None, tag: str = ""):
        super().__init__("decode_steps", FIELDS, folder, tag)

    def record(
        self,
        start_s: float,
        import_ms: float,
        layers: int,
        step_ms: float,
        batch: int,
        done_ms: float,
        wait_ms: float = 0.0,
        recv_ms: float = 0.0,
    ) -> None:
        self._add(
            (
                f"{start_s:.6f}",
                f"{import_ms:.3f}",
                layers,
                f"{step_ms:.3f}",
                batch,
                f"{done_ms:.3f}",
                f"{wait_ms:.3f}",
                f"{recv_ms:.3f}",
            )
        )


class ReceiveTrace(CsvTrace):
    def __init__(self, folder: str | os.PathLike | None = None, tag: str = ""):
        super().__init__("decode_recv", RECV_FIELDS, folder, tag)

    def handed_over(
        self,
        layer: int,
        nbytes: int,
        timing: dict[str, float],
        prev_s: float,
        now: float,
        cpu_ms: float = 0.0,
    ) -> None:
        """Record a layer the receive thread handed over at `now` (time.time). timing:
        recv_layer's (header_s, payload_s, map_ms, checksum_ms; a host layer, one message, has
        no payload_s or checksum_ms); prev_s: the thread's previous hand-over; cpu_ms: its CPU
        time since then."""
        if self.path is None:
            return
        header_s = timing.get("header_s", now)
        payload_s = timing.get("payload_s", header_s)
        self._add(  # RECV_FIELDS
            (
                f"{header_s:.6f}",
                f"{1e3 * max(0.0, header_s - prev_s):.3f}",
                f"{1e3 * (payload_s - header_s):.3f}",
                f"{timing.get('map_ms', 0.0):.3f}",
                f"{1e3 * (now - payload_s):.3f}",
                nbytes,
                layer,
                f"{timing.get('checksum_ms', 0.0):.3f}",
                f"{cpu_ms:.3f}",
            )
        )


class ReturnTrace(CsvTrace):
    def __init__(self, folder: str | os.PathLike | None = None, tag: str = ""):
        super().__init__("decode_returns", RETURN_FIELDS, folder, tag)

    def returned(
        self,
        handed_s: float,
        gpu_wait_ms: float,
        returned_s: float,
        layers: int,
        nbytes: int,
        release_ms: float = 0.0,
        ack_ms: float = 0.0,
    ) -> None:
        """Record one batch given back (times: time.time)."""
        self._add(
            (
                f"{handed_s:.6f}",
                f"{gpu_wait_ms:.3f}",
                f"{returned_s:.6f}",
                layers,
                nbytes,
                f"{release_ms:.3f}",
                f"{ack_ms:.3f}",
            )
        )
