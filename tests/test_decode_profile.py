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


def test_engine_bench_lanes_count_the_bytes_they_read():
    """bench engine's lanes: on codes a step reads the codec's bytes (hack2 ~5x fewer than
    bf16), decoded dense the bf16 pool's; the largest batch is the pool's pages over a
    sequence's; the table sets each lane beside the first and names cells that do not fit."""
    from zipserve.bench import engine_bench
    from zipserve.engine.config import EngineConfig
    from zipserve.engine.llm_engine import LLMEngine

    per_token = {}
    for lane in ("bf16", "hack2", "hack2/dense"):
        codec, mode = engine_bench.parse_lane(lane)
        eng = LLMEngine(
            str(REFERENCE_MODEL),
            device="cpu",
            max_model_len=1024,
            engine_config=EngineConfig(codec=codec, decode_kv=mode, num_pages=40),
        )
        per_token[lane] = engine_bench.kv_bytes_per_token(eng, 1024)
        assert engine_bench.max_batch(eng, 1023) == eng.pool.capacity // 16
    assert per_token["hack2/dense"] == per_token["bf16"]
    bf16_bytes = per_token["bf16"] * 2 / eng.dtype.itemsize  # the CPU engine runs in fp32
    assert 3.5 < bf16_bytes / per_token["hack2"] < 6.5
    row = dict(step_ms=2.0, tokens_per_s=4000.0, kv_gb=1.0, achieved_tbps=1.0, roofline_frac=0.3)
    rows = [
        dict(lane="bf16", batch=8, context=64, max_batch=9, **row),
        dict(row, lane="hack2", batch=8, context=64, max_batch=40, tokens_per_s=6000.0),
        dict(lane="bf16", batch=64, context=64, max_batch=9),
    ]
    table = "\n".join(engine_bench.decode_table(rows, ["bf16", "hack2"], 3e12))
    assert "| hack2 | 8 | 64 | 2.00 | 6000 | 1.50x |" in table
    assert "| bf16 | 64 | 64 | does not fit |" in table
