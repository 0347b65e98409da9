"""The prefill worker's opt-in send trace (ZIPSERVE_STEP_TRACE, prefill_worker/send_trace.py)
and what bench/step_gaps.py makes of it: a served request leaves one row per layer and one for
its forward pass's end, and the time its last layer left after that end is split by what the
sender thread did meanwhile."""

from __future__ import annotations

import csv

import pytest
from disagg_helpers import serve_one, shutdown_pair, worker_pair

from zipserve.bench import step_gaps
from zipserve.control.csv_trace import ENV
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.llm import SamplingParams
from zipserve.prefill_worker.send_trace import END_LAYER, SEND_FIELDS, SendTrace

MODEL = str(REFERENCE_MODEL)


def _row(rid, layer, queued, taken, ready=0.0, ack=0.0, send=0.0, nbytes=100, export=0.0):
    return {
        "request_id": rid,
        "layer": float(layer),
        "nbytes": float(nbytes),
        "queued_s": queued,
        "taken_s": taken,
        "ready_ms": ready,
        "ack_ms": ack,
        "export_ms": export,
        "send_ms": send,
    }


def test_send_trace_is_off_without_the_variable(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    t = SendTrace()
    t.sent("r", 0, 10, 1.0, 1.0, 0.5, 0.0, 0.1)
    t.flush()
    assert not t.on and t.path is None


def test_send_trace_rows_are_written(tmp_path):
    t = SendTrace(tmp_path, tag="hack2")
    t.sent("r1", 3, 4096, 100.0, 100.002, 1.25, 7.5, 0.5, 0.75)
    t.sent("r1", END_LAYER, 0, 100.001, 100.01, 0, 0, 0.25)
    t.flush()
    assert t.path.name.startswith("prefill_send_hack2_")
    rows = list(csv.DictReader(t.path.open()))
    assert tuple(rows[0]) == SEND_FIELDS and len(rows) == 2
    assert rows[0]["request_id"] == "r1" and rows[0]["layer"] == "3"
    assert float(rows[0]["ack_ms"]) == 7.5 and float(rows[1]["send_ms"]) == 0.25
    assert float(rows[0]["cpu_ms"]) == 0.75 and float(rows[1]["cpu_ms"]) == 0
    assert float(rows[0]["export_ms"]) == 0
    (got,) = step_gaps.read_sends(tmp_path).values()
    assert got[0]["request_id"] == "r1" and got[1]["layer"] == END_LAYER


def test_a_trace_from_before_the_export_split_reads_with_export_0(tmp_path):
    """Session 25-26 traces have no export_ms column: their exports count in send_ms."""
    old = [f for f in SEND_FIELDS if f != "export_ms"]
    with (tmp_path / "prefill_send_bf16_1.csv").open("w") as f:
        f.write(",".join(old) + "\n" + "r,0,100,10.0,10.0,1.0,0.0,4.0,2.0\n")
        f.write("r,-1,0,10.002,10.006,0,0,0,0\n")
    (rows,) = step_gaps.read_sends(tmp_path).values()
    assert rows[0]["export_ms"] == 0.0 and rows[0]["send_ms"] == 4.0
    (tail,) = step_gaps.send_tails(rows)
    assert tail["send_ms"] == pytest.approx(3.0) and tail["export_ms"] == 0.0


def test_tail_after_the_forward_pass_is_split_by_what_the_sender_did():
    """Request b's forward pass ends at t=10.0 while the thread still sends a's last layer
    (10 ms, all after 10.0: 'earlier'); b's layer 0 then waits 20 ms for acknowledgements,
    exports its handle in 2 and sends for 3, and after a 15 ms gap (nothing traced: 'between') layer 1 takes 30 ms for its
    gather and checksum. Its last layer left 80 ms after the forward pass."""
    rows = [
        _row("a", 0, 9.90, 9.90, ready=1.0),
        _row("a", END_LAYER, 9.95, 9.95),
        _row("a", 1, 9.94, 10.0, send=10.0),  # the thread got to it 50 ms after a's end
        _row("b", 0, 9.98, 10.010, ack=20.0, export=2.0, send=3.0),
        _row("b", 1, 9.99, 10.050, ready=30.0),
        _row("b", END_LAYER, 10.0, 10.08),
    ]
    tails = {t["request_id"]: t for t in step_gaps.send_tails(rows)}
    b = tails["b"]
    assert b["tail_ms"] == pytest.approx(80.0)
    assert b["earlier_ms"] == pytest.approx(10.0)
    assert b["ack_ms"] == pytest.approx(20.0) and b["send_ms"] == pytest.approx(3.0)
    assert b["export_ms"] == pytest.approx(2.0)
    assert b["ready_ms"] == pytest.approx(30.0)
    assert b["between_ms"] == pytest.approx(15.0)
    assert b["layers_after"] == 2
    a = tails["a"]  # a's layer 1 left 60 ms after a's end: 50 ms untraced, then its send
    assert a["tail_ms"] == pytest.approx(60.0) and a["send_ms"] == pytest.approx(10.0)
    assert a["between_ms"] == pytest.approx(50.0)
    text = "\n".join(step_gaps.send_summary(rows, step_gaps.send_tails(rows)))
    assert "2 requests, 4 layers" in text
    assert "p90 80.0, max 80.0" in text
    assert "slowest: 80 ms (2 layers after the forward pass)" in text
    assert (
        "acknowledgements 20, export 2, send 3, the link's hand-over 0, earlier requests 10, "
        "between 15 ms" in text
    )


def test_a_shaped_links_hand_over_of_the_last_message_counts_in_the_tail():
    """Over an emulated link the sends only queue; the request-end row's flush waits for the
    link to hand the last message over, and the tail runs until then."""
    rows = [
        _row("r", 0, 10.0, 10.0, ready=1.0, send=1.0),
        _row("r", END_LAYER, 10.001, 10.002, send=98.0),  # flushed at 10.100
    ]
    (tail,) = step_gaps.send_tails(rows)
    assert tail["tail_ms"] == pytest.approx(99.0)
    assert tail["flush_ms"] == pytest.approx(98.0) and tail["layers_after"] == 1
    assert tail["send_ms"] == pytest.approx(1.0) and tail["between_ms"] == pytest.approx(
        0.0, abs=1e-6
    )


def test_step_gaps_reads_a_send_trace_alone(tmp_path, capsys):
    t = SendTrace(tmp_path, tag="bf16")
    t.sent("r", 0, 100, 50.0, 50.0, 2.0, 0.0, 1.0, 0.75)
    t.sent("r", END_LAYER, 0, 50.001, 50.003, 0, 0, 0)
    t.flush()
    step_gaps.main(["--trace", str(tmp_path)])
    out = capsys.readouterr().out
    assert "prefill sender: 1 requests, 1 layers" in out
    assert "median 2.0 ms" in out  # the layer left 3 ms after it was queued, 1 ms before the end
    assert "CPU time was 25% of its time in those parts" in out  # 0.75 of 3 ms
    assert (tmp_path / "send_tails.csv").exists()


@pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
def test_served_request_leaves_every_layer_and_its_end_in_the_send_trace(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path))
    pre, dec, _ = worker_pair(MODEL, "hack2")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    try:
        rep, _ = serve_one(pre, dec, "r", list(range(3, 200)), params)
        dec.release("r")
    finally:
        shutdown_pair(pre, dec)
    # written per request (the actor is killed, not shut down): no flush() here
    (rows,) = step_gaps.read_sends(tmp_path).values()
    # both workers' stall monitors ran beside the traces (control/stall_monitor.py)
    assert {s.split("_")[0] for s in step_gaps.read_stalls(tmp_path)} == {"prefill", "decode"}
    layers = [r for r in rows if r["layer"] != END_LAYER]
    assert sorted(int(r["layer"]) for r in layers) == list(range(dec.num_layers))
    assert all(r["request_id"] == "r" for r in rows)
    assert sum(r["nbytes"] for r in layers) == rep.bytes_sent
    assert all(r["taken_s"] >= r["queued_s"] and r["ready_ms"] > 0 for r in layers)
    assert all(r["ack_ms"] == 0 for r in layers)  # an in-process channel never waits for acks
    slack = 1.0  # ms: the CPU clock's and the wall clock's reads are not the same instant
    assert all(0 <= r["cpu_ms"] <= r["ready_ms"] + r["send_ms"] + slack for r in layers)
    (end,) = [r for r in rows if r["layer"] == END_LAYER]
    assert end["queued_s"] >= max(r["queued_s"] for r in layers)  # after the forward pass
    (tail,) = step_gaps.send_tails(rows)
    parts = ("ready_ms", "ack_ms", "send_ms", "flush_ms", "earlier_ms", "between_ms")
    assert tail["tail_ms"] >= 0 and tail["tail_ms"] == pytest.approx(sum(tail[k] for k in parts))
    assert pre.stats().used_pages == 0 and dec.stats().used_pages == 0


def test_kv_inflight_prompts_defaults_to_one_and_names_the_variable_on_bad_values(monkeypatch):
    from zipserve.prefill_worker.worker import INFLIGHT_ENV, kv_inflight_prompts

    monkeypatch.delenv(INFLIGHT_ENV, raising=False)
    assert kv_inflight_prompts() == 1
    monkeypatch.setenv(INFLIGHT_ENV, " 2 ")
    assert kv_inflight_prompts() == 2
    for bad in ("0", "-1", "1.5", "two", "\u00b2", "\u0663"):  # superscript 2, Arabic-Indic 3
        with pytest.raises(ValueError, match=INFLIGHT_ENV):
            kv_inflight_prompts(bad)
