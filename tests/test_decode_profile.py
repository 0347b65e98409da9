"""bench/decode_profile.py on the CPU: one row per lane with time in it, kernels sorted into
kinds, both CSVs written, every page back in the pool (the tool asserts it)."""

from __future__ import annotations

import csv

import pytest

from zipserve.bench import decode_profile
from zipserve.deploy.cli import REFERENCE_MODEL

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)


def test_kernel_names_sort_into_kinds():
    kind = decode_profile.kind_of
    assert kind("_hack_decode_kernel") == "attention on codes"
    assert kind("_paged_decode_kernel") == "dense paged attention"
    assert kind("_hack_encode_planes_kernel") == "encode / dequantize"
    assert kind("_merge_splits_kernel") == "split merge"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kind("something_new") == "other"
    assert decode_profile.parse_lane("hack2/dense") == ("hack2", "dense")
    assert decode_profile.parse_lane("bf16") == ("bf16", "compressed")


def test_profile_on_cpu_writes_a_row_per_lane(tmp_path):
    lanes = ["bf16", "hack2", "hack2/dense"]
    summary = decode_profile.run(
        str(REFERENCE_MODEL), "cpu", lanes, batch=2, context=100, steps=2, out_dir=tmp_path
    )
    assert [s["lane"] for s in summary] == lanes
    assert all(s["step_ms"] > 0 and s["profiled_us"] > 0 and s["launches"] > 0 for s in summary)
    with open(tmp_path / "decode_profile_kinds.csv") as f:
        assert [r["lane"] for r in csv.DictReader(f)] == lanes
    with open(tmp_path / "decode_profile.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["lane"] for r in rows} == set(lanes) and all(
        float(r["us_per_step"]) > 0 for r in rows
    )
