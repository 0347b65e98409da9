"""bench/prefill_profile.py on the CPU: a row per codec with the prefill split into forward and
export, the wire bytes of what was exported (fewer for a 2-bit codec), the CSV written, and every
page of the prefill engine back in its pool (the tool asserts it)."""

from __future__ import annotations

import csv

import pytest

from zipserve.bench import prefill_profile
from zipserve.engine import disaggregated


def test_prefill_profile_on_cpu(tmp_path):
    codecs = ["bf16", "hack2"]
    rows = prefill_profile.run(
        "random:tiny", "cpu", codecs, tokens=300, repeats=2, out_dir=tmp_path
    )
    assert [r["codec"] for r in rows] == codecs
    for r in rows:
        assert r["prefill_ms"] > 0 and r["forward_ms"] > 0 and r["export_host_ms"] > 0
        assert r["device_form"] is False  # the host form on the CPU
    bf16, hack2 = rows
    assert 0 < hack2["wire_mb"] < bf16["wire_mb"] / 3  # 2-bit pages, the open page in 16-bit
    with open(tmp_path / "prefill_profile.csv") as f:
        assert [r["codec"] for r in csv.DictReader(f)] == codecs
    # the export hooks are undone
    assert disaggregated.export_layer.__module__ == "zipserve.engine.kv_export"
    assert disaggregated.held_nbytes.__module__ == "zipserve.engine.kv_export"


def test_prefill_profile_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        prefill_profile.main(["--tokens", "0"])
    with pytest.raises(SystemExit):
        prefill_profile.main(["--codecs", ","])
