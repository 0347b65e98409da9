"""bench/jct_merge.py on two real sweeps of one H100 run back to back (session 17's `round14`:
bf16, kivi2, hack2; `jct-16b`: fp8, hack4, hack2mix, lowrank+hack2): every cell and request kept,
the report's goals evaluated for the second sweep's codecs against the first's bf16, and the
refusals (another workload, a cell twice, one sweep)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from zipserve.bench import jct_merge, jct_report
from zipserve.bench.jct_plots import load_csv

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "session17_h100"
FIRST = RESULTS / "round14" / "jct_16"
SECOND = RESULTS / "jct-16b" / "jct_16b"


def _raw(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _copy(src: Path, dst: Path) -> Path:
    """The sweep's CSVs and meta (not its plots) in a folder of its own."""
    dst.mkdir(parents=True)
    for name in ("jct_summary.csv", "jct_requests.csv", "jct_meta.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_merge_keeps_every_cell_and_evaluates_goals_across_sweeps(tmp_path):
    out = jct_merge.merge([FIRST, SECOND], tmp_path / "merged")
    summary = load_csv(out / "jct_summary.csv")
    first, second = load_csv(FIRST / "jct_summary.csv"), load_csv(SECOND / "jct_summary.csv")
    assert len(summary) == len(first) + len(second) == 42  # 7 lanes x 2 links x 3 rates
    raw = _raw(out / "jct_summary.csv")  # as written (NaN cells compare as text)
    assert raw == _raw(FIRST / "jct_summary.csv") + _raw(SECOND / "jct_summary.csv")
    rows = load_csv(out / "jct_requests.csv")
    assert len(rows) == len(load_csv(FIRST / "jct_requests.csv")) + len(
        load_csv(SECOND / "jct_requests.csv")
    )
    meta = json.loads((out / "jct_meta.json").read_text())
    assert meta["merged_from"] == [str(FIRST), str(SECOND)]
    assert meta["config"]["codecs"] == [
        "bf16", "kivi2", "hack2", "fp8", "hack4", "hack2mix", "lowrank+hack2"
    ]  # fmt: skip
    assert meta["command"].count("bench jct --sweep") == 2
    goals = "\n".join(jct_report.goals(summary, rows))
    # the second sweep alone has no bf16 (its goals are "not evaluable"); merged, they are
    assert "not evaluable" in "\n".join(
        jct_report.goals(second, load_csv(SECOND / "jct_requests.csv"))
    )
    assert "lowrank+hack2: worst mean JCT 2.27x bf16's" in goals
    assert "fp8/dense" in goals and "not evaluable" not in goals


def test_merge_refuses_other_workloads_shared_cells_and_one_sweep(tmp_path):
    other = _copy(SECOND, tmp_path / "other")
    meta = json.loads((other / "jct_meta.json").read_text())
    meta["config"]["num_requests"] = 8
    (other / "jct_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config num_requests 8 differs"):
        jct_merge.merge([FIRST, other], tmp_path / "a")
    ab = _copy(SECOND, tmp_path / "ab")
    meta = json.loads((ab / "jct_meta.json").read_text())
    meta["import_during_step"] = False  # an A/B run of the decode worker's imports
    (ab / "jct_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="import_during_step False differs"):
        jct_merge.merge([FIRST, ab], tmp_path / "e")
    meta["import_during_step"] = json.loads((FIRST / "jct_meta.json").read_text()).get(
        "import_during_step"
    )
    meta["kv_inflight_prompts"] = 2  # an A/B run of the prefill worker's in-flight cap
    (ab / "jct_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="kv_inflight_prompts 2 differs .* 1"):
        jct_merge.merge([FIRST, ab], tmp_path / "f")
    meta["kv_inflight_prompts"] = 1  # what the sweeps before it was recorded ran with
    (ab / "jct_meta.json").write_text(json.dumps(meta))
    assert (jct_merge.merge([FIRST, ab], tmp_path / "g") / "jct_meta.json").exists()
    with pytest.raises(ValueError, match="is in both"):
        jct_merge.merge([FIRST, _copy(FIRST, tmp_path / "again")], tmp_path / "b")
    with pytest.raises(ValueError, match="at least two"):
        jct_merge.merge([FIRST], tmp_path / "c")
    with pytest.raises(SystemExit):  # the CLI says why, no traceback
        jct_merge.main([str(FIRST), str(other), "--out", str(tmp_path / "d")])
    assert not any((tmp_path / n).exists() for n in ("a", "d", "e"))
