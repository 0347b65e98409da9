"""StepTrace: an opt-in record of the decode worker's step loop, one CSV row per pass that did
something: when it began (epoch seconds), how long it spent importing arrived layers, in the
decode step (the engine's step, which waits for its tokens) and handing CUDA-IPC buffers to
the thread that gives them back (decode_worker/buffer_returns.py; until session 14: giving back),
how many layers it imported, how many sequences the step decoded, and how long the
longest-waiting of those layers had been handed over before the pass took it (`wait_ms`), and
the longest any of them took the receive thread, from its first message to its hand-over
(`recv_ms`).

Off unless ZIPSERVE_STEP_TRACE names a folder; each worker process then writes
`<folder>/decode_steps_<tag>_<pid>.csv` (the tag: the worker's codec; rows buffered, flushed
every FLUSH_ROWS and at shutdown).
`python3 -m zipserve.bench.step_gaps` puts the long passes beside the requests' prefills.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

ENV = "ZIPSERVE_STEP_TRACE"
FIELDS = ("start_s", "import_ms", "layers", "step_ms", "batch", "done_ms", "wait_ms", "recv_ms")
FLUSH_ROWS = 256


class StepTrace:
    def __init__(self, folder: str | os.PathLike | None = None, tag: str = ""):
        folder = folder if folder is not None else os.environ.get(ENV)
        name = f"decode_steps_{tag}_{os.getpid()}.csv" if tag else f"decode_steps_{os.getpid()}.csv"
        self.path = None if not folder else Path(folder) / name
        self._rows: list[tuple] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(FIELDS)

    @property
    def on(self) -> bool:
        return self.path is not None

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
        if self.path is None:
            return
        self._rows.append(
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
        if len(self._rows) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.path is None or not self._rows:
            return
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows(self._rows)
        self._rows.clear()
