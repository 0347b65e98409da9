"""`CsvTrace`: the opt-in CSV traces the workers write for finding where a request's time goes
under load (decode_worker/step_trace.py, prefill_worker/send_trace.py).

Off unless ZIPSERVE_STEP_TRACE names a folder (or a folder is passed); each trace then appends
its rows to `<folder>/<prefix>_<tag>_<pid>.csv`, buffered and flushed every FLUSH_ROWS rows, at
`flush()`, and wherever its owner chooses. Recording on a trace that is off does nothing.
"""

from __future__ import annotations

import csv
import os
import threading
from pathlib import Path

ENV = "ZIPSERVE_STEP_TRACE"
FLUSH_ROWS = 256


class CsvTrace:
    """Rows buffered and appended to `<folder>/<prefix>_<tag>_<pid>.csv` (folder: the argument,
    else $ZIPSERVE_STEP_TRACE; neither: off, and recording does nothing)."""

    def __init__(self, prefix: str, fields: tuple[str, ...], folder=None, tag: str = ""):
        folder = folder if folder is not None else os.environ.get(ENV)
        name = f"{prefix}_{tag}_{os.getpid()}.csv" if tag else f"{prefix}_{os.getpid()}.csv"
        self.path = None if not folder else Path(folder) / name
        self._rows: list[tuple] = []
        self._lock = threading.Lock()  # several threads may record into one trace
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(fields)

    @property
    def on(self) -> bool:
        return self.path is not None

    def _add(self, row: tuple) -> None:
        if self.path is None:
            return
        with self._lock:
            self._rows.append(row)
            full = len(self._rows) >= FLUSH_ROWS
        if full:
            self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        with self._lock:
            rows, self._rows = self._rows, []
        if rows:
            with self.path.open("a", newline="") as f:
                csv.writer(f).writerows(rows)
