"""ZIPSERVE_GIL_SWITCH_MS: parsed and validated where it is read, applied by the workers."""

from __future__ import annotations

import sys

import pytest

from zipserve.control.gil_switch import (
    ENV,
    apply_worker_switch_interval,
    gil_switch_setting,
    worker_switch_interval_s,
)


@pytest.mark.parametrize(
    "raw,want", [("", None), ("python", None), (" Python ", None), ("0.5", 5e-4), ("5", 5e-3)]
)
def test_values(raw, want):
    got = worker_switch_interval_s(raw)
    assert got == pytest.approx(want) if want is not None else got is None


@pytest.mark.parametrize("raw", ["0", "-1", "fast", "nan", "inf"])
def test_bad_values_name_the_variable(raw):
    with pytest.raises(ValueError, match=ENV):
        worker_switch_interval_s(raw)


def test_apply_sets_the_interval_only_when_asked(monkeypatch):
    before = sys.getswitchinterval()
    try:
        monkeypatch.delenv(ENV, raising=False)
        assert apply_worker_switch_interval() == before and gil_switch_setting() == "python"
        monkeypatch.setenv(ENV, "0.25")
        assert apply_worker_switch_interval() == pytest.approx(2.5e-4)
        assert sys.getswitchinterval() == pytest.approx(2.5e-4)
        assert gil_switch_setting() == "0.25"
    finally:
        sys.setswitchinterval(before)


def test_serve_refuses_a_bad_setting_before_starting_ray(monkeypatch):
    from zipserve.deploy import serve

    monkeypatch.setenv(ENV, "soon")
    with pytest.raises(ValueError, match=ENV):
        serve.start_ray(None)


def test_handoff_bench_runs_and_reports_the_sends_excess(capsys):
    """bench/gil_handoff.py end to end on a few small sends (its numbers are for the bench to
    print, not for a test to time): one table row per interval, a finite excess each."""
    import math

    from zipserve.bench.gil_handoff import main

    main(["--intervals-ms", "5,0.5", "--sends", "5", "--mb", "0.01"])
    rows = [
        ln
        for ln in capsys.readouterr().out.splitlines()
        if ln.startswith("| ") and "ms |" not in ln
    ]
    assert [r.split("|")[1].strip() for r in rows] == ["5", "0.5"]
    assert all(math.isfinite(float(r.split("|")[2])) for r in rows)
