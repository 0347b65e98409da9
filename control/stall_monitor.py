"""`StallMonitor`: an opt-in thread that finds the moments a worker process ran no Python.

It sleeps PERIOD_S at a time and records each wake-up more than LATE_MS late: when it went to
sleep (`start_s`, epoch seconds), how late it woke (`late_ms`), the CPU time the whole process
used meanwhile (`process_cpu_ms`) and where every other thread was right after (`threads`:
name, then file:line and function of its innermost frame in zipserve, `|` between threads; the
thread that held the GIL has only just let go of it, so it is usually still on the line that
held it). A late wake-up means no thread let it run: either another
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

import logging
import os
import sys
import threading
import time

from zipserve.control.csv_trace import CsvTrace

log = logging.getLogger(__name__)
STALL_FIELDS = ("start_s", "late_ms", "process_cpu_ms", "threads")
_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep
"""The zipserve source tree (its modules, tests and benchmarks)."""
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
                self._add((f"{start:.6f}", f"{late_ms:.3f}", f"{cpu_ms:.3f}", where_threads_are()))
                try:
                    self.flush()
                except OSError as e:  # the trace folder went away: say so and stop monitoring
                    log.warning("stall monitor stops: cannot write %s: %s", self.path, e)
                    return

    def stop(self) -> None:
        """End the thread (idempotent); the rows are on disk already."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def where_threads_are() -> str:
    """Every thread but the caller: `name file:line function` of its innermost frame in a
    zipserve module (its innermost frame when none is), joined by ` | `."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        f, where = frame, None
        while f is not None and where is None:
            path = os.path.realpath(f.f_code.co_filename)
            if path.startswith(_ROOT):
                where = f"{path[len(_ROOT) :]}:{f.f_lineno} {f.f_code.co_name}"
            f = f.f_back
        if where is None:  # no zipserve frame: the innermost one
            code = frame.f_code
            where = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"
        out.append(f"{names.get(ident, ident)} {where}")
    return " | ".join(sorted(out))
