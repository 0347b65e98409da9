"""bench/import_profile.py on the CPU: a row per lane with the host time of a layer's import, the
aten calls it makes (more for a codec's codes than for bf16's pages, more again when they are
decoded dense on the way in), the CSV written, and every page of both engines back in its pool
(the tool asserts it)."""

from __future__ import annotations

import csv
import os

import pytest

from zipserve.bench import import_profile
from zipserve.engine.device_import import DEVICE_IMPORT_ENV


def test_import_profile_on_cpu(tmp_path):
    lanes = [("bf16", "compressed"), ("hack2", "compressed"), ("hack2", "dense")]
    before = os.environ.get(DEVICE_IMPORT_ENV)
    rows = import_profile.run("random:tiny", "cpu", lanes, tokens=200, repeats=2, out_dir=tmp_path)
    assert os.environ.get(DEVICE_IMPORT_ENV) == before  # the lanes' switch is put back
    assert [(r["codec"], r["decode_kv"], r["import_path"]) for r in rows] == [
        ("bf16", "compressed", "one_copy"),
        ("bf16", "compressed", "import_pages"),
        ("hack2", "compressed", "one_copy"),
        ("hack2", "compressed", "import_pages"),
        ("hack2", "dense", "import_pages"),
    ]
    for r in rows:
        assert r["host_ms_per_layer"] > 0 and r["wall_ms_per_request"] > 0
        assert r["layers"] > 0 and "aten::" in r["top_ops"]
        assert 0 < r["python_calls_per_layer"] <= r["aten_calls_per_layer"]
    bf16, codes, dense = (r["aten_calls_per_layer"] for r in rows if r["import_path"] != "one_copy")
    assert bf16 < codes < dense
    with open(tmp_path / "import_profile.csv") as f:
        got = [(r["decode_kv"], r["import_path"]) for r in csv.DictReader(f)]
    assert got == [(r["decode_kv"], r["import_path"]) for r in rows]


def test_import_profile_lanes_and_bad_arguments():
    got = import_profile.lanes_of("bf16, kivi2/dense,")
    assert got == [("bf16", "compressed"), ("kivi2", "dense")]
    for bad in (["--lanes", ","], ["--lanes", "hack2/sparse"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            import_profile.main(bad)
