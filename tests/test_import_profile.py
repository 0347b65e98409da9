"""bench/import_profile.py on the CPU: a row per lane with the host time of a layer's import, the
aten calls it makes (more for a codec's codes than for bf16's pages, more again when they are
decoded dense on the way in), the CSV written, and every page of both engines back in its pool
(the tool asserts it)."""

from __future__ import annotations

import csv

import pytest

from zipserve.bench import import_profile


def test_import_profile_on_cpu(tmp_path):
    lanes = [("bf16", "compressed"), ("hack2", "compressed"), ("hack2", "dense")]
    rows = import_profile.run("random:tiny", "cpu", lanes, tokens=200, repeats=2, out_dir=tmp_path)
    assert [(r["codec"], r["decode_kv"]) for r in rows] == lanes
    for r in rows:
        assert r["host_ms_per_layer"] > 0 and r["wall_ms_per_request"] > 0
        assert r["layers"] > 0 and "aten::" in r["top_ops"]
    bf16, codes, dense = (r["aten_calls_per_layer"] for r in rows)
    assert bf16 < codes < dense
    with open(tmp_path / "import_profile.csv") as f:
        assert [r["decode_kv"] for r in csv.DictReader(f)] == ["compressed", "compressed", "dense"]


def test_import_profile_lanes_and_bad_arguments():
    got = import_profile.lanes_of("bf16, kivi2/dense,")
    assert got == [("bf16", "compressed"), ("kivi2", "dense")]
    for bad in (["--lanes", ","], ["--lanes", "hack2/sparse"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            import_profile.main(bad)
