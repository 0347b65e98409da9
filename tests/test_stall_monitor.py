"""The stall monitor (control/stall_monitor.py) records when its process ran no Python: a C call
that holds the GIL while it waits (here libc's usleep through ctypes.PyDLL, which keeps the GIL)
shows as one late wake-up, with next to no process CPU in it; step_gaps sums the stalls and says
how much of the slowest send tail they cover. Off without ZIPSERVE_STEP_TRACE."""

from __future__ import annotations

import csv
import ctypes
import shutil
import threading
import time

import pytest

from zipserve.bench import step_gaps
from zipserve.control.csv_trace import ENV
from zipserve.control.stall_monitor import STALL_FIELDS, StallMonitor


def test_off_without_the_variable(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    m = StallMonitor("decode")
    assert not m.on and m._thread is None
    m.stop()


def _hold_the_gil(ms: int) -> None:
    ctypes.PyDLL(None).usleep(1000 * ms)  # in C with the GIL held


def test_a_wait_that_holds_the_gil_is_one_stall_with_no_cpu(tmp_path):
    m = StallMonitor("decode", tmp_path, tag="bf16")
    try:
        time.sleep(0.05)
        held = time.time()
        _hold_the_gil(150)
        time.sleep(0.05)
    finally:
        m.stop()
    assert m.path.name.startswith("decode_stalls_bf16_")
    rows = list(csv.DictReader(m.path.open()))
    assert tuple(rows[0]) == STALL_FIELDS
    (stall,) = [r for r in rows if float(r["late_ms"]) >= 100]
    assert float(stall["late_ms"]) < 400
    assert abs(float(stall["start_s"]) - held) < 0.05
    assert float(stall["process_cpu_ms"]) < 0.5 * float(stall["late_ms"])
    # the main thread, right after it let go: still on the call that held it
    (main,) = [t for t in stall["threads"].split(" | ") if t.startswith("MainThread ")]
    assert main.startswith("MainThread tests/test_stall_monitor.py:")
    assert main.endswith(" _hold_the_gil")
    (got,) = step_gaps.read_stalls(tmp_path).values()
    assert any(r["late_ms"] >= 100 for r in got)


def test_where_threads_are_names_each_other_threads_innermost_zipserve_frame():
    from zipserve.control.stall_monitor import where_threads_are

    ready, release = threading.Event(), threading.Event()

    def worker():
        ready.set()
        release.wait(5)

    t = threading.Thread(target=worker, name="kv-send-x", daemon=True)
    t.start()
    ready.wait(5)
    try:
        got = where_threads_are()
    finally:
        release.set()
        t.join()
    assert "kv-send-x tests/test_stall_monitor.py:" in got and " worker" in got
    assert "MainThread" not in got  # the caller is left out


def test_stalls_are_summed_over_the_slowest_send_tail():
    rows = [
        {"start_s": 10.00, "late_ms": 100.0, "process_cpu_ms": 2.0, "threads": "a x.py:1 f"},
        {"start_s": 10.50, "late_ms": 50.0, "process_cpu_ms": 48.0, "threads": "b y.py:2 g"},
    ]
    assert step_gaps.stalled_ms(rows, 10.05, 10.52) == pytest.approx(70.0)
    tails = [
        {"request_id": "a", "tail_ms": 20.0, "end_s": 9.0},
        {"request_id": "b", "tail_ms": 500.0, "end_s": 10.05},  # 10.05-10.55
    ]
    line, longest = step_gaps.stall_summary("decode_stalls_bf16_1", rows, tails)
    assert "longest: 100 ms with 2 ms of CPU; the other threads then: a x.py:1 f" in longest
    assert "2 stalls, median 100 ms, max 100 ms, 150 ms in all" in line
    assert "the process used 33% of a CPU in them" in line  # 50 of 150 ms
    assert "100 of the slowest send tail's 500 ms" in line  # 50 + 50 ms
    assert "no stall" in step_gaps.stall_summary("prefill_stalls_bf16_2", [], tails)[0]


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="period_s and late_ms must be positive"):
        StallMonitor("decode", tmp_path, period_s=0)
    assert not list(tmp_path.iterdir())  # refused before any file was made


def test_a_folder_that_goes_away_stops_the_monitor_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "trace"
    m = StallMonitor("prefill", folder, late_ms=20.0)
    shutil.rmtree(folder)
    with caplog.at_level("WARNING", logger="zipserve.control.stall_monitor"):
        _hold_the_gil(60)
        m._thread.join(timeout=2)
    assert not m._thread.is_alive()
    assert "stall monitor stops: cannot write" in caplog.text
    m.stop()
