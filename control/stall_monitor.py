"""`StallMonitor`: an opt-in thread that finds the moments a worker process ran no Python.

It sleeps PERIOD_S at a time and records each wake-up more than LATE_MS late: when it went to
sleep (`start_s`, epoch seconds), how late it woke (`late_ms`) and the CPU time the whole process
used meanwhile (`process_cpu_ms`). A late wake-up means no thread let it run: either another
thread held the GIL (computing in Python: process_cpu_ms near late_ms; or waiting in C code that
does not release it, for the GPU, a lock or the driver: process_cpu_ms near 0), or the host
did not schedule the process (process_cpu_ms near 0 too; the host's /proc/stat steal and load,
which the runbook samples, tell these two apart). Set beside the send and receive traces, it says
whether a layer's slow send or hand-over was the whole process stopping or one thread waiting.

Off unless ZIPSERVE_STEP_TRACE names a folder (control/csv_trace.py); each worker then writes
`<folder>/<role>_stalls_<tag>_<pid>.csv`, every row flushed at once (stalls are rare and the
prefill actor is killed, not shut down). `python3 -m zipserve.bench.step_gaps` reads them.
"""

from __future__ import annotations

import os
import threading
import time

from zipserve.control.csv_trace import CsvTrace

STALL_FIELDS = ("start_s", "late_ms", "process_cpu_ms")
PERIOD_S = 0.005
LATE_MS = 20.0


class StallMonitor(CsvTrace):
    def __init__(
        self,
        role: str,
        folder: str | os.PathLike | None = None,
        tag: str = "",
        period_s: float = PERIOD_S,
        late_ms: float = LATE_MS,
    ):
        if period_s <= 0 or late_ms <= 0:
            raise ValueError(f"period_s and late_ms must be positive, got {period_s}, {late_ms}")
        super().__init__(f"{role}_stalls", STALL_FIELDS, folder, tag)
        self.period_s, self.late_ms = period_s, late_ms
        self._stop = threading.Event()
        self._thread = None
        if self.on:
            self._thread = threading.Thread(target=self._run, name=f"{role}-stalls", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start, cpu = time.time(), time.process_time()
            time.sleep(self.period_s)
            late_ms = 1e3 * (time.time() - start - self.period_s)
            if late_ms >= self.late_ms:
                cpu_ms = 1e3 * (time.process_time() - cpu)
                self._add((f"{start:.6f}", f"{late_ms:.3f}", f"{cpu_ms:.3f}"))
                self.flush()

    def stop(self) -> None:
        """End the thread (idempotent); the rows are on disk already."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
