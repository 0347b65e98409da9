"""Where the decode worker's long gaps between tokens go: its step trace
(decode_worker/step_trace.py, ZIPSERVE_STEP_TRACE) beside the sweep's requests; and where the
prefill worker's late layers go (prefill_worker/send_trace.py, the same variable).

    python3 -m zipserve.bench.step_gaps --trace DIR --requests jct_requests.csv [--gap-ms 50]

A pass of the step loop longer than --gap-ms is a gap a running request's next token waited
for. Each one is put down to the part that took longest (import of arrived layers, the decode
step, giving CUDA-IPC buffers back) and marked when a request's prefill ran meanwhile (from the
requests' transfer_start_s and prefill_ms: a prefill ends where its transfer phase starts).
Also says how long received layers waited for the step loop to import them (`wait_ms`: a
transfer phase that is long while the link is idle shows there) and, from the receive trace
(decode_recv_*.csv), what each layer cost the receive thread and whether layers queued for it,
and from the return trace (decode_returns_*.csv) how long imported CUDA-IPC layers took to go
back to their sender (what a sender at its in-flight limit waits for).
From the prefill worker's send trace (prefill_send_*.csv): how long after each request's forward
pass its last layer left (the sending part of its transfer phase), and what the sender thread did
meanwhile: waiting for the layer's gather and checksum (`ready`), for the receiver to give
buffers back (`acks`), exporting CUDA IPC handles (`export`), in the channel's sends (`send`),
on an earlier request's layers
(`earlier`), or nothing traced (`between`: the thread waiting for the GIL, or Python).
From each worker's stall monitor (`*_stalls_*.csv`, control/stall_monitor.py): when the process
ran no Python at all, and how much of the slowest send tail that covers.
Prints a summary and writes step_gaps.csv (and send_tails.csv) beside the trace.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from zipserve.control.stall_monitor import LATE_MS
from zipserve.prefill_worker.send_trace import END_LAYER

PARTS = ("import_ms", "step_ms", "done_ms")
SEND_PARTS = ("ready_ms", "ack_ms", "export_ms", "send_ms")
TAIL_PARTS = (*SEND_PARTS, "flush_ms", "earlier_ms", "between_ms")
"""What send_tails splits a request's tail into."""


def _read_traces(folder: Path, prefix: str, text: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """The rows of every `<prefix>_*.csv` in folder, numbers as floats (the columns in `text`
    stay strings), keyed by the file's stem."""
    out = {}
    for path in sorted(folder.glob(f"{prefix}_*.csv")):
        with path.open() as f:
            out[path.stem] = [
                {k: (v if k in text else float(v)) for k, v in r.items()} for r in csv.DictReader(f)
            ]
    return out


def _per_decode_worker(folder: Path, prefix: str) -> dict[str, list[dict]]:
    """A decode worker's `<prefix>_*.csv` rows keyed like read_passes' "worker" (the name of
    the same worker's step trace)."""
    return {
        stem.replace(prefix, "decode_steps", 1): rows
        for stem, rows in _read_traces(folder, prefix).items()
    }


def read_passes(folder: Path) -> list[dict]:
    return [
        {**row, "worker": stem}
        for stem, rows in _read_traces(folder, "decode_steps").items()
        for row in rows
    ]


def read_receives(folder: Path) -> dict[str, list[dict]]:
    """The receive trace's rows per decode worker (keyed like read_passes' "worker")."""
    return _per_decode_worker(folder, "decode_recv")


def _p(values: list[float], q: float) -> float:
    """The q-quantile of values (the value at sorted index int(q * n), the last for q = 1)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _median_p90(values: list[float]) -> str:
    return f"{_p(values, 0.5):.1f} / {_p(values, 0.9):.1f}"


def receive_summary(rows: list[dict], behind_ms: float = 1.0) -> list[str]:
    """What a layer cost the receive thread (header to hand-over, split), and how many found
    the next message already waiting (idle < behind_ms: the thread, not the sender, set the
    pace)."""
    if not rows:
        return []
    col = {k: [r[k] for r in rows] for k in ("payload_ms", "map_ms", "verify_ms")}
    cost = [r["payload_ms"] + r["verify_ms"] for r in rows]
    behind = sum(1 for r in rows if r["idle_ms"] < behind_ms)
    mb = sum(r["nbytes"] for r in rows) / len(rows) / 2**20
    return [
        f"receive thread: {len(rows)} layers ({mb:.1f} MiB mean), per layer median / p90 ms: "
        f"total {_median_p90(cost)}, payload {_median_p90(col['payload_ms'])} (mapping "
        f"{_median_p90(col['map_ms'])}), header and checksum {_median_p90(col['verify_ms'])}; "
        f"{behind} of them were already waiting when the thread got to them"
    ] + _slowest_verify(rows)


def _slowest_verify(rows: list[dict]) -> list[str]:
    """The layer the receive thread held longest after its payload, with how long queueing its
    checksum took and the thread's CPU time (traces from session 27 on; older ones lack them)."""
    if not all("cpu_ms" in r and "checksum_ms" in r for r in rows):
        return []
    worst = max(rows, key=lambda r: r["verify_ms"])
    return [
        f"  slowest after its payload: {worst['verify_ms']:.1f} ms (layer {worst['layer']:.0f}), "
        f"of it queueing the checksum {worst['checksum_ms']:.1f} ms; the thread's CPU time "
        f"since its previous layer {worst['cpu_ms']:.1f} ms (far below: it waited, for the "
        "GIL, a lock or the driver)"
    ]


def read_returns(folder: Path) -> dict[str, list[dict]]:
    """The return trace's rows (batches of CUDA-IPC layers given back) per decode worker (keyed
    like read_passes' "worker")."""
    return {
        worker: [{"release_ms": math.nan, "ack_ms": math.nan, **r} for r in rows]
        for worker, rows in _per_decode_worker(folder, "decode_returns").items()
    }  # traces before session 27 have no release / ack split


def return_summary(rows: list[dict]) -> list[str]:
    """How long imported CUDA-IPC layers took to go back to their sender after the step loop
    handed them over, and how much of it was the wait for the GPU to finish reading them."""
    if not rows:
        return []
    late = [1e3 * (r["returned_s"] - r["handed_s"]) for r in rows]
    gpu = [r["gpu_wait_ms"] for r in rows]
    layers = int(sum(r["layers"] for r in rows))
    return [
        f"buffers given back: {len(rows)} batches ({layers} layers), median / p90 / max ms after "
        f"the step loop handed them over: {_p(late, 0.5):.1f} / {_p(late, 0.9):.1f} / "
        f"{max(late):.1f}, of it waiting for the GPU's reads {_p(gpu, 0.5):.1f} / "
        f"{_p(gpu, 0.9):.1f} / {max(gpu):.1f}"
    ] + _release_ack_line(rows, layers)


def _release_ack_line(rows: list[dict], layers: int) -> list[str]:
    """Where the give-back's own time went: dropping the mappings, sending the acknowledgements
    (none for traces that predate the split)."""
    release = [r["release_ms"] for r in rows if not math.isnan(r["release_ms"])]
    acks = [r["ack_ms"] for r in rows if not math.isnan(r["ack_ms"])]
    if not release:
        return []
    return [
        f"  per batch median / p90 ms: dropping the mappings {_median_p90(release)}, sending "
        f"the acknowledgements {_median_p90(acks)}; in all {sum(release):.0f} + {sum(acks):.0f} "
        f"ms ({(sum(release) + sum(acks)) / max(layers, 1):.2f} ms a layer)"
    ]


def read_sends(folder: Path) -> dict[str, list[dict]]:
    """The prefill send trace's rows per prefill worker (the file's stem); traces written
    before export_ms was split out of send_ms have it 0."""
    traces = _read_traces(folder, "prefill_send", text=("request_id",))
    return {stem: [{"export_ms": 0.0, **r} for r in rows] for stem, rows in traces.items()}


def _send_spans(row: dict) -> list[tuple[str, float, float]]:
    """(part, start, end) epoch seconds of what one row's sender thread did, in order: a sent
    layer's SEND_PARTS, or a request-end row's wait for the link to hand the request's last
    message over (`flush_ms`: a shaped link's queue; about 0 without one)."""
    t = row["taken_s"]
    if row["layer"] == END_LAYER:
        return [("flush_ms", t, t + row["send_ms"] / 1e3)]
    out = []
    for part in SEND_PARTS:
        out.append((part, t, t + row[part] / 1e3))
        t += row[part] / 1e3
    return out


def send_tails(rows: list[dict]) -> list[dict]:
    """Per request of one prefill worker: how long after its forward pass ended its last layer
    left (`tail_ms`: until the sender handed it over, and a shaped link its last message), split
    by what the sender thread did in that window: its own layers' SEND_PARTS, the link's
    hand-over (`flush_ms`), an earlier request's layers (`earlier_ms`) or nothing traced
    (`between_ms`)."""
    ends = {r["request_id"]: r for r in rows if r["layer"] == END_LAYER}
    spans = [(r, _send_spans(r)) for r in rows]
    out = []
    for rid, end_row in ends.items():
        mine = [(r, sp) for r, sp in spans if r["request_id"] == rid]
        if len(mine) < 2:  # the end row alone: nothing was sent
            continue
        fwd_end = end_row["queued_s"]
        last = max(sp[-1][2] for _, sp in mine)
        tail = {"request_id": rid, "tail_ms": 1e3 * max(0.0, last - fwd_end), "end_s": fwd_end}
        tail.update({p: 0.0 for p in TAIL_PARTS})
        tail["layers_after"] = sum(
            1 for r, sp in mine if r["layer"] != END_LAYER and sp[-1][2] > fwd_end
        )
        for r, sp in spans:
            for part, a, b in sp:
                d = 1e3 * max(0.0, min(b, last) - max(a, fwd_end))
                if d > 0:
                    tail[part if r["request_id"] == rid else "earlier_ms"] += d
        traced = sum(tail[p] for p in TAIL_PARTS if p != "between_ms")
        tail["between_ms"] = max(0.0, tail["tail_ms"] - traced)
        out.append(tail)
    return out


def send_summary(rows: list[dict], tails: list[dict]) -> list[str]:
    """What a prefill worker's layers cost its sender thread, and what kept each request's last
    layer after its forward pass (tails: send_tails(rows))."""
    sent = [r for r in rows if r["layer"] != END_LAYER]
    if not sent or not tails:
        return []
    waited = [1e3 * max(0.0, r["taken_s"] - r["queued_s"]) for r in sent]
    lines = [
        f"prefill sender: {len(tails)} requests, {len(sent)} layers; per layer median / p90 ms: "
        f"waited for the thread {_median_p90(waited)}, gather + checksum "
        f"{_median_p90([r['ready_ms'] for r in sent])}, acknowledgements "
        f"{_median_p90([r['ack_ms'] for r in sent])}, export "
        f"{_median_p90([r['export_ms'] for r in sent])}, send "
        f"{_median_p90([r['send_ms'] for r in sent])}"
    ]
    if all("cpu_ms" in r for r in sent):
        busy = sum(r["cpu_ms"] for r in sent)
        wall = sum(r[p] for r in sent for p in SEND_PARTS) or 1.0
        lines.append(
            f"  the sender thread's CPU time was {100 * busy / wall:.0f}% of its time in those "
            "parts (the rest it waited: for the GPU, the peer or the GIL)"
        )
    ms = [t["tail_ms"] for t in tails]
    total = sum(ms) or 1.0
    share = {k: 100 * sum(t[k] for t in tails) / total for k in TAIL_PARTS}
    lines.append(
        f"last layer left after the forward pass: median {_p(ms, 0.5):.1f} ms, p90 "
        f"{_p(ms, 0.9):.1f}, max {max(ms):.1f}; of that time: gather + checksum "
        f"{share['ready_ms']:.0f}%, acknowledgements {share['ack_ms']:.0f}%, export "
        f"{share['export_ms']:.0f}%, send {share['send_ms']:.0f}%, the link's hand-over "
        f"{share['flush_ms']:.0f}%, earlier requests' layers {share['earlier_ms']:.0f}%, "
        f"between layers {share['between_ms']:.0f}%"
    )
    worst = max(tails, key=lambda t: t["tail_ms"])
    lines.append(
        f"  slowest: {worst['tail_ms']:.0f} ms ({worst['layers_after']} layers after the "
        f"forward pass): gather + checksum {worst['ready_ms']:.0f}, acknowledgements "
        f"{worst['ack_ms']:.0f}, export {worst['export_ms']:.0f}, send "
        f"{worst['send_ms']:.0f}, the link's hand-over "
        f"{worst['flush_ms']:.0f}, earlier requests {worst['earlier_ms']:.0f}, between "
        f"{worst['between_ms']:.0f} ms"
    )
    return lines


def read_stalls(folder: Path) -> dict[str, list[dict]]:
    """Each worker's stall monitor rows (control/stall_monitor.py), keyed by the file's stem
    (`prefill_stalls_<tag>_<pid>`, `decode_stalls_<tag>_<pid>`)."""
    text = ("threads",)
    return {
        **_read_traces(folder, "prefill_stalls", text),
        **_read_traces(folder, "decode_stalls", text),
    }


def stalled_ms(rows: list[dict], start: float, end: float) -> float:
    """How much of [start, end] (epoch seconds) the process ran no Python: the overlap of the
    monitor's late wake-ups with it, in ms."""
    total = 0.0
    for r in rows:
        a = r["start_s"]
        b = a + r["late_ms"] / 1e3
        total += max(0.0, min(b, end) - max(a, start))
    return 1e3 * total


def stall_summary(name: str, rows: list[dict], tails: list[dict]) -> list[str]:
    """A worker's stalls: how many, how long, the process's CPU in them (near 0: no thread
    computed; the process was off the CPU or a thread held the GIL while it waited), and how
    much of the slowest send tail (tails: send_tails of the run) fell in them."""
    if not rows:
        return [f"{name}: no stall (no wake-up of its monitor {LATE_MS:.0f} ms or more late)"]
    late = [r["late_ms"] for r in rows]
    cpu = sum(r["process_cpu_ms"] for r in rows)
    line = (
        f"{name}: {len(rows)} stalls, median {_p(late, 0.5):.0f} ms, max {max(late):.0f} ms, "
        f"{sum(late):.0f} ms in all; the process used {100 * cpu / sum(late):.0f}% of a CPU "
        "in them"
    )
    if tails:
        worst = max(tails, key=lambda t: t["tail_ms"])
        end = worst["end_s"] + worst["tail_ms"] / 1e3
        line += (
            f"; {stalled_ms(rows, worst['end_s'], end):.0f} of the slowest send tail's "
            f"{worst['tail_ms']:.0f} ms"
        )
    worst = max(rows, key=lambda r: r["late_ms"])
    return [
        line,
        f"  longest: {worst['late_ms']:.0f} ms with {worst['process_cpu_ms']:.0f} ms of CPU; the "
        f"other threads then: {worst.get('threads') or '?'}",
    ]


def prefill_spans(requests_csv: Path) -> list[tuple[float, float]]:
    """(start, end) epoch seconds of every request's prefill."""
    spans = []
    with requests_csv.open() as f:
        for r in csv.DictReader(f):
            try:
                end, ms = float(r["transfer_start_s"]), float(r["prefill_ms"])
            except (KeyError, ValueError):
                continue
            spans.append((end - ms / 1e3, end))
    return spans


def gaps(passes: list[dict], spans: list[tuple[float, float]], gap_ms: float) -> list[dict]:
    """The passes longer than gap_ms, each with its largest part and the prefill overlap."""
    out = []
    for p in passes:
        total = sum(p[k] for k in PARTS)
        if total <= gap_ms:
            continue
        start, end = p["start_s"], p["start_s"] + total / 1e3
        overlap = sum(max(0.0, min(end, e) - max(start, s)) for s, e in spans)
        out.append(
            {
                **p,
                "total_ms": total,
                "largest": max(PARTS, key=lambda k: p[k]),
                "prefill_overlap_ms": overlap * 1e3,
            }
        )
    return out


def summary(passes: list[dict], found: list[dict], gap_ms: float) -> list[str]:
    stepped = [p for p in passes if p["batch"] > 0]
    lines = [
        f"{len(passes)} passes ({len(stepped)} decode steps); {len(found)} longer than "
        f"{gap_ms:g} ms"
    ]
    waits = [p["wait_ms"] for p in passes if p["layers"] > 0 and "wait_ms" in p]
    if waits:
        lines.append(
            f"received layers waited for the step loop: median {_p(waits, 0.5):.1f} ms, "
            f"max {max(waits):.1f} ms (over {len(waits)} passes that imported)"
        )
    recv = [p["recv_ms"] for p in passes if p["layers"] > 0 and "recv_ms" in p]
    if recv:
        lines.append(
            f"received layers took the receive thread (first message to hand-over, the slowest "
            f"of each pass): median {_p(recv, 0.5):.1f} ms, max {max(recv):.1f} ms"
        )
    if stepped:
        ms = [p["step_ms"] for p in stepped]
        lines.append(
            f"decode step ms: median {_p(ms, 0.5):.1f}, p99 {_p(ms, 0.99):.1f}, max {max(ms):.1f}"
        )
    for part in PARTS:
        mine = [g for g in found if g["largest"] == part]
        if mine:
            with_prefill = sum(1 for g in mine if g["prefill_overlap_ms"] > 0)
            lines.append(
                f"  {part[:-3]}: {len(mine)} gaps, mean {sum(g[part] for g in mine) / len(mine):.0f}"
                f" ms of it; {with_prefill} of them while a prefill ran"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True, type=Path, help="the ZIPSERVE_STEP_TRACE folder")
    ap.add_argument("--requests", type=Path, help="the sweep's jct_requests.csv")
    ap.add_argument("--gap-ms", type=float, default=50.0)
    a = ap.parse_args(argv)
    if a.gap_ms <= 0:
        ap.error("--gap-ms: must be positive")
    passes = read_passes(a.trace)
    sends = read_sends(a.trace)
    if not passes and not sends:
        ap.error(f"--trace: no decode_steps_*.csv or prefill_send_*.csv in {a.trace}")
    spans = prefill_spans(a.requests) if a.requests else []
    found = gaps(passes, spans, a.gap_ms)
    receives = read_receives(a.trace)
    returns = read_returns(a.trace)
    workers = sorted({p["worker"] for p in passes})
    for worker in workers:  # a sweep of several codecs traces one decode worker per codec
        if len(workers) > 1:
            print(f"{worker.removeprefix('decode_steps_')}:")
        mine = [p for p in passes if p["worker"] == worker]
        lines = summary(mine, [g for g in found if g["worker"] == worker], a.gap_ms)
        lines += receive_summary(receives.get(worker, []))
        print("\n".join(lines + return_summary(returns.get(worker, []))))
    all_tails = []
    for worker, rows in sends.items():  # one prefill worker per codec, like the decode side
        if len(sends) > 1:
            print(f"{worker}:")
        tails = send_tails(rows)
        print("\n".join(send_summary(rows, tails)))
        all_tails += [{**t, "worker": worker} for t in tails]
    stalls = read_stalls(a.trace)
    for name, rows in stalls.items():
        print("\n".join(stall_summary(name, rows, all_tails)))
    if all_tails:
        out = a.trace / "send_tails.csv"
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(all_tails[0]))
            w.writeheader()
            w.writerows(all_tails)
        print(f"wrote {out}")
    out = a.trace / "step_gaps.csv"
    if found:
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(found[0]))
            w.writeheader()
            w.writerows(found)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
