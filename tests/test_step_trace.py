"""The decode worker's opt-in step trace (ZIPSERVE_STEP_TRACE) and bench/step_gaps.py, which
reads it: a served request leaves one row per step (its layers' import included) in the trace,
and the long passes are put down to their largest part and to the prefills running then."""

from __future__ import annotations

import csv
import time

import pytest
import torch
from disagg_helpers import serve_one, shutdown_pair, worker_pair

from zipserve.bench import step_gaps
from zipserve.decode_worker.step_trace import (
    ENV,
    FIELDS,
    RECV_FIELDS,
    RETURN_FIELDS,
    ReceiveTrace,
    ReturnTrace,
    StepTrace,
)
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.llm import SamplingParams

MODEL = str(REFERENCE_MODEL)


def test_trace_is_off_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    t = StepTrace()
    t.record(1.0, 0.1, 2, 3.0, 1, 0.0)
    t.flush()
    assert not t.on and t.path is None


def test_trace_rows_are_flushed(tmp_path):
    t = StepTrace(tmp_path)
    t.record(10.0, 0.5, 32, 12.25, 3, 0.1, 4.5, 2.25)
    t.record(10.1, 0.0, 0, 9.0, 3, 0.0)
    t.flush()
    rows = list(csv.DictReader(t.path.open()))
    assert tuple(rows[0]) == FIELDS and len(rows) == 2
    assert rows[0]["layers"] == "32" and float(rows[0]["step_ms"]) == 12.25
    assert float(rows[0]["wait_ms"]) == 4.5 and float(rows[1]["wait_ms"]) == 0
    assert float(rows[0]["recv_ms"]) == 2.25 and float(rows[1]["recv_ms"]) == 0


def test_receive_trace_splits_a_layers_time_and_tells_when_layers_queued(monkeypatch, tmp_path):
    """handed_over() turns recv_layer's timing into a row (idle since the previous hand-over,
    payload, mapping, the rest); step_gaps sums them up and counts the layers that found the
    receive thread busy (the next message already waiting)."""
    t = ReceiveTrace(tmp_path, tag="bf16")
    t.handed_over(
        3,
        1 << 20,
        {"header_s": 100.0, "payload_s": 100.02, "map_ms": 15.0, "checksum_ms": 8.0},
        99.9,
        100.03,
        cpu_ms=1.5,
    )
    t.handed_over(4, 1 << 20, {"header_s": 100.03, "payload_s": 100.03}, 100.03, 100.03)
    t.flush()
    rows = list(csv.DictReader(t.path.open()))
    assert tuple(rows[0]) == RECV_FIELDS and len(rows) == 2
    assert float(rows[0]["idle_ms"]) == pytest.approx(100.0)
    assert float(rows[0]["payload_ms"]) == pytest.approx(20.0)
    assert float(rows[0]["map_ms"]) == 15.0 and rows[0]["layer"] == "3"
    assert float(rows[0]["verify_ms"]) == pytest.approx(10.0)
    assert float(rows[1]["idle_ms"]) == 0 and float(rows[1]["payload_ms"]) == 0
    (got,) = step_gaps.read_receives(tmp_path).values()
    text = step_gaps.receive_summary(got)[0]
    assert "2 layers (1.0 MiB mean)" in text
    assert "1 of them were already waiting" in text
    assert float(rows[0]["checksum_ms"]) == 8.0 and float(rows[0]["cpu_ms"]) == 1.5
    slowest = step_gaps.receive_summary(got)[1]
    assert "slowest after its payload: 10.0 ms (layer 3)" in slowest
    assert "queueing the checksum 8.0 ms" in slowest and "previous layer 1.5 ms" in slowest
    monkeypatch.delenv(ENV, raising=False)
    off = ReceiveTrace(None)  # no folder, no variable: nothing recorded
    off.handed_over(0, 1, {}, 0.0, 1.0)
    off.flush()
    assert off.path is None and not off.on


@pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
def test_served_request_leaves_its_steps_in_the_trace(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path))
    pre, dec, _ = worker_pair(MODEL, "hack2")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 200))
    try:
        serve_one(pre, dec, "r", prompt, params)
        dec.release("r")
    finally:
        shutdown_pair(pre, dec)
    passes = step_gaps.read_passes(tmp_path)
    assert sum(p["layers"] for p in passes) == dec.num_layers  # every layer imported once
    (received,) = step_gaps.read_receives(tmp_path).values()  # one row per layer received
    assert sorted(int(r["layer"]) for r in received) == list(range(dec.num_layers))
    assert all(r["nbytes"] > 0 and r["payload_ms"] == 0 and r["map_ms"] == 0 for r in received)
    assert sum(1 for p in passes if p["batch"] == 1) == 11  # 12 tokens, the first from prefill
    assert all(p[k] >= 0 for p in passes for k in (*step_gaps.PARTS, "wait_ms", "recv_ms"))
    assert any(p["recv_ms"] > 0 for p in passes if p["layers"])  # the receive thread's share
    (returned,) = step_gaps.read_returns(tmp_path).values()  # every imported layer went back
    assert sum(r["layers"] for r in returned) == dec.num_layers
    assert all(r["returned_s"] >= r["handed_s"] and r["gpu_wait_ms"] >= 0 for r in returned)


def test_return_trace_times_each_batch_given_back(monkeypatch, tmp_path):
    """BufferReturns with a ReturnTrace: one row per batch handed over (an empty one is none),
    from the hand-over to the last acknowledgement; step_gaps sums them up."""
    from zipserve.decode_worker import buffer_returns

    def slow_done(kv):
        time.sleep(0.01)

    monkeypatch.setattr(buffer_returns, "done", slow_done)
    trace = ReturnTrace(tmp_path, tag="bf16")
    returns = buffer_returns.BufferReturns(trace=trace)
    cpu = torch.device("cpu")
    returns.give_back(["a", "b", "c"], cpu)
    returns.give_back([], cpu)
    returns.give_back(["d"], cpu)
    returns.close()
    trace.flush()
    rows = list(csv.DictReader(trace.path.open()))
    assert tuple(rows[0]) == RETURN_FIELDS and [r["layers"] for r in rows] == ["3", "1"]
    took = [float(r["returned_s"]) - float(r["handed_s"]) for r in rows]
    assert took[0] >= 0.03 and took[1] >= 0.01  # three and one 10-ms give-backs
    assert all(float(r["gpu_wait_ms"]) == pytest.approx(0, abs=1.0) for r in rows)  # no GPU
    assert float(rows[0]["release_ms"]) >= 30 and float(rows[0]["ack_ms"]) >= 0
    (got,) = step_gaps.read_returns(tmp_path).values()
    text, split = step_gaps.return_summary(got)
    assert text.startswith("buffers given back: 2 batches (4 layers)")
    assert "dropping the mappings" in split and "ms a layer" in split


def test_step_gaps_reads_return_traces_without_the_release_split(tmp_path):
    """A return trace written before release_ms / ack_ms existed still sums up (one line)."""
    (tmp_path / "decode_returns_bf16_1.csv").write_text(
        "handed_s,gpu_wait_ms,returned_s,layers,nbytes\n100.0,0.5,100.01,2,64\n"
    )
    (got,) = step_gaps.read_returns(tmp_path).values()
    (text,) = step_gaps.return_summary(got)
    assert text.startswith("buffers given back: 1 batches (2 layers)")


def test_gaps_name_their_largest_part_and_the_prefills_meanwhile(tmp_path):
    passes = [
        {
            "start_s": 100.0,
            "import_ms": 1.0,
            "layers": 0,
            "step_ms": 10.0,
            "batch": 2,
            "done_ms": 0,
            "wait_ms": 0,
            "recv_ms": 0,
        },
        {
            "start_s": 100.1,
            "import_ms": 2.0,
            "layers": 4,
            "step_ms": 180.0,
            "batch": 2,
            "done_ms": 0,
            "wait_ms": 3.0,
            "recv_ms": 2.0,
        },
        {
            "start_s": 101.0,
            "import_ms": 90.0,
            "layers": 32,
            "step_ms": 5.0,
            "batch": 2,
            "done_ms": 0,
            "wait_ms": 170.0,
            "recv_ms": 40.0,
        },
    ]
    spans = [(100.15, 100.25)]  # a prefill inside the second pass, none during the third
    found = step_gaps.gaps(passes, spans, gap_ms=50)
    assert [g["largest"] for g in found] == ["step_ms", "import_ms"]
    assert found[0]["prefill_overlap_ms"] == pytest.approx(100.0)
    assert found[1]["prefill_overlap_ms"] == 0
    text = "\n".join(step_gaps.summary(passes, found, 50))
    assert "2 longer than 50 ms" in text
    assert (
        "took the receive thread (first message to hand-over, the slowest of each pass): "
        "median 40.0 ms, max 40.0 ms" in text
    )
    assert "waited for the step loop: median 170.0 ms, max 170.0 ms (over 2 passes" in text
    assert "step: 1 gaps, mean 180 ms of it; 1 of them while a prefill ran" in text
    assert "import: 1 gaps, mean 90 ms of it; 0 of them while a prefill ran" in text
    reqs = tmp_path / "jct_requests.csv"
    reqs.write_text("transfer_start_s,prefill_ms\n100.25,100\n,\n")
    assert step_gaps.prefill_spans(reqs) == [(pytest.approx(100.15), 100.25)]


def test_a_sweep_of_several_codecs_is_summarised_per_decode_worker(tmp_path, capsys):
    """Each decode worker names its trace file after its codec; step_gaps then reports each
    worker's passes apart (one sweep runs a decode worker per codec)."""
    for tag, step_ms in (("bf16", 10.0), ("hack2", 70.0)):
        t = StepTrace(tmp_path, tag=tag)
        assert t.path.name.startswith(f"decode_steps_{tag}_")
        t.record(100.0, 0.5, 1, step_ms, 2, 0.0)
        t.record(100.1, 0.5, 0, step_ms, 2, 0.0)
        t.flush()
        t.path.rename(t.path.with_name(f"decode_steps_{tag}_1.csv"))  # one pid in this process
    step_gaps.main(["--trace", str(tmp_path)])
    out = capsys.readouterr().out
    bf16, hack2 = out.split("hack2_1:")
    assert bf16.startswith("bf16_1:") and "0 longer than 50 ms" in bf16
    assert "median 10.0" in bf16 and "median 70.0" in hack2
    assert "2 longer than 50 ms" in hack2 and "step: 2 gaps" in hack2
