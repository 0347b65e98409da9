"""The serving goals of issue 16, evaluated from a sweep's CSVs, as sentences that say met,
missed or not evaluable (and why).

- Transfer phase: with no link limit <= 50 ms for every request and every codec, and never
  longer for a compressed codec than for bf16 (mean); with an emulated link, each request's
  transfer <= its wire bytes / link rate + 50 ms (also shown: against the least a FIFO link
  allows, its layers leaving from its prefill's start after the bytes of earlier requests).
- At 10 Gb/s, at the lowest rate where bf16's link is >= 80% busy while transferring: hack2's
  mean JCT <= 0.4x bf16's and <= 0.8x kivi2's; hack2's highest sustained rate >= 3x bf16's.
- With no link limit: no compressed codec's mean JCT above 1.05x bf16's at any rate both ran.
- Beside the 0.4x goal: bf16's own JCT at that rate with no link limit, the best any codec could
  do by sending less (what is left is prefill and decode), and hack2's own decode phase as a
  fraction of bf16's JCT (no byte saved shortens it). Beside the 3x-rate goal, where hack2
  sustained no rate: both codecs' completions per second at the highest rate run (when both
  ran it).

"Busy while transferring" is the link's busy time over the span from the run's first transfer
start to its last transfer end (from the request rows); the run-wide figure (`link_busy` in the
summary, over the whole run including the decode tail) is the fallback for older CSVs.
"""

from __future__ import annotations

from zipserve.bench.jct_plots import _ok, _rate_x, base_codec, lane

TRANSFER_SLACK_MS = 50.0
NO_LINK_JCT_SLACK = 1.05


def _rate(r) -> str:
    return r if isinstance(r, str) else f"{r:g}"


def _s(ms) -> str:
    return f"{ms / 1e3:.2f}" if _ok(ms) else "—"


def _lower(cut: float) -> str:
    """A relative cut as words: '25% lower', or '2% higher' when it is negative."""
    return f"{100 * cut:.0f}% lower" if cut >= 0 else f"{-100 * cut:.0f}% higher"


def _key(r: dict) -> tuple:
    return lane(r), r["link_gbps"], r["rate"]


def busy_while_transferring(rows: list[dict]) -> float | None:
    """One run's link busy fraction between its first transfer start and last transfer end
    (None when the rows carry no transfer times)."""
    spans = []
    for r in rows:
        start = r.get("transfer_start_s")
        if not _ok(start):  # older CSVs: the phases are back to back from the send
            parts = [r.get(k) for k in ("send_time", "http_in_ms", "queue_ms", "prefill_ms")]
            if not all(_ok(p) for p in parts):
                continue
            start = parts[0] + sum(parts[1:]) / 1e3
        if _ok(r.get("transfer_ms")):
            spans.append((start, start + r["transfer_ms"] / 1e3))
    if not spans:
        return None
    window = max(e for _, e in spans) - min(s for s, _ in spans)
    return min(1.0, sum(e - s for s, e in spans) / window) if window > 0 else None


def highest_sustained(summary: list[dict], codec: str, link) -> float | str | None:
    """The highest rate `codec` sustained at `link`: a lane ("hack2/dense") exactly, a bare codec
    ("hack2") in any of its lanes (compressed or dense decode)."""
    good = [
        s["rate"]
        for s in summary
        if codec in (lane(s), base_codec(lane(s)))
        and s["link_gbps"] == link
        and s["sustained"] is True
    ]
    return max(good, key=_rate_x) if good else None


def _busy(s: dict, rows_by_run: dict) -> float | None:
    rows = rows_by_run.get(_key(s))
    b = busy_while_transferring(rows) if rows else None
    return b if b is not None else (s.get("link_busy") if _ok(s.get("link_busy")) else None)


def link_goals(summary: list[dict], rows: list[dict] | None = None, link=10.0) -> list[str]:
    """JCT and sustained-rate goals at `link` Gb/s."""
    runs = [s for s in summary if s["link_gbps"] == link]
    if not runs:
        return [f"No {link:g} Gb/s link in this sweep: the link goals are not evaluated."]
    by_run: dict = {}
    for r in rows or []:
        by_run.setdefault(_key(r), []).append(r)
    out = []
    bf = sorted((s for s in runs if lane(s) == "bf16"), key=lambda s: _rate_x(s["rate"]))
    at = {(lane(s), s["rate"]): s for s in runs}
    busy = [(s, b) for s in bf if (b := _busy(s, by_run)) is not None and b >= 0.8]
    if not bf:
        out.append("bf16 was not run: the JCT goals are not evaluable.")
    elif not busy:
        top = max((b for s in bf if (b := _busy(s, by_run)) is not None), default=float("nan"))
        out.append(
            f"bf16 never kept the link >= 80% busy at the rates run (at most "
            f"{100 * top:.0f}% while transferring): the 0.4x/0.8x JCT goals are not "
            f"evaluable; run higher rates."
        )
    else:
        ref, b = busy[0]
        r = ref["rate"]
        line = (
            f"Reference rate {_rate(r)} req/s (lowest where bf16 kept the link "
            f"{100 * b:.0f}% busy): bf16 mean JCT {_s(ref['jct_mean_ms'])} s"
        )
        free = next(
            (
                s
                for s in summary
                if lane(s) == "bf16" and s["link_gbps"] in ("none", None) and s["rate"] == r
            ),
            None,
        )
        if free is not None and _ok(free["jct_mean_ms"]):
            floor = 1 - free["jct_mean_ms"] / ref["jct_mean_ms"]
            line += (
                f" (with no link limit {_s(free['jct_mean_ms'])} s: a codec sending no bytes "
                f"at all, decoding as fast as bf16, would be {100 * floor:.0f}% lower)"
            )
        lanes = [c for c in dict.fromkeys(lane(s) for s in runs) if base_codec(c) == "hack2"]
        if not any(_ok(at.get((c, r), {}).get("jct_mean_ms")) for c in lanes):
            out.append(line + "; hack2 was not run there: not evaluable.")
        else:
            parts = []
            for c in lanes:
                h2 = at.get((c, r))
                if h2 is None or not _ok(h2["jct_mean_ms"]):
                    continue
                cut = 1 - h2["jct_mean_ms"] / ref["jct_mean_ms"]
                part = (
                    f"{c} {_s(h2['jct_mean_ms'])} s ({_lower(cut)}; goal >= 60% lower: "
                    f"{'met' if cut >= 0.6 else '**missed**'}"
                )
                if _ok(h2.get("decode_mean_ms")):  # the part no byte saved can shorten
                    part += (
                        f"; its decode phase alone {_s(h2['decode_mean_ms'])} s, "
                        f"{h2['decode_mean_ms'] / ref['jct_mean_ms']:.2f}x bf16's mean JCT"
                    )
                part += ")"
                k2 = at.get((c.replace("hack2", "kivi2"), r)) or next(  # else as auto ran it
                    (s for s in runs if base_codec(lane(s)) == "kivi2" and s["rate"] == r), None
                )
                if k2 is not None and _ok(k2["jct_mean_ms"]):
                    cut_k = 1 - h2["jct_mean_ms"] / k2["jct_mean_ms"]
                    part += (
                        f"; vs {lane(k2)} {_s(k2['jct_mean_ms'])} s: {_lower(cut_k)} "
                        f"(goal >= 20% lower: {'met' if cut_k >= 0.2 else '**missed**'})"
                    )
                else:
                    part += "; kivi2 not run there"
                parts.append(part)
            out.append(line + ", " + "; ".join(parts) + ".")
    hb, hh = highest_sustained(runs, "bf16", link), highest_sustained(runs, "hack2", link)
    if hh is None:
        out.append(
            "hack2 sustained none of the rates run: the 3x-rate goal is **missed** (or "
            "the rates are too high)." + _completions(runs)
        )
    elif hb is None:
        out.append(
            f"bf16 sustained none of the rates run, hack2 up to {_rate(hh)} req/s: the "
            f"3x-rate goal needs lower rates to be measured."
        )
    else:
        ratio = _rate_x(hh) / _rate_x(hb)
        top = max((s["rate"] for s in runs), key=_rate_x)
        caveat = (
            ", but some codec sustained the highest rate run: the true ratio may differ"
            if top in (hb, hh)
            else ""
        )
        out.append(
            f"Highest sustained rate: bf16 {_rate(hb)}, hack2 {_rate(hh)} req/s "
            f"({ratio:.1f}x; goal >= 3x: {'met' if ratio >= 3 else '**missed**'}"
            f"{caveat})."
        )
    return out


def _completions(runs: list[dict]) -> str:
    """' At R req/s offered bf16 completed X req/s (ok/sent served), hack2 Y req/s (...): Zx.'
    at each codec's highest rate run, from the summary's completed_per_s; '' where that is
    missing or the two highest rates differ."""
    best: dict = {}
    for s in runs:
        c = base_codec(lane(s))
        if c in ("bf16", "hack2") and _ok(s.get("completed_per_s")):
            if c not in best or _rate_x(s["rate"]) > _rate_x(best[c]["rate"]):
                best[c] = s
    bf, h2 = best.get("bf16"), best.get("hack2")
    if bf is None or h2 is None or bf["rate"] != h2["rate"] or not bf["completed_per_s"] > 0:
        return ""

    def served(s: dict) -> str:
        n = (
            f" ({s['ok']:g}/{s['sent']:g} served)"
            if _ok(s.get("ok")) and _ok(s.get("sent"))
            else ""
        )
        return f"{s['completed_per_s']:.2f} req/s{n}"

    return (
        f" At {_rate(bf['rate'])} req/s offered bf16 completed {served(bf)}, "
        f"{lane(h2)} {served(h2)}: {h2['completed_per_s'] / bf['completed_per_s']:.1f}x."
    )


def no_link_goals(summary: list[dict]) -> list[str]:
    """Each compressed lane's worst mean-JCT ratio to bf16 over the rates both ran, unlimited."""
    runs = [s for s in summary if s["link_gbps"] in ("none", None) and _ok(s["jct_mean_ms"])]
    bf = {s["rate"]: s["jct_mean_ms"] for s in runs if lane(s) == "bf16"}
    if not bf:
        return ["No unlimited-link bf16 run: the no-link goal is not evaluated."]
    out = []
    for c in dict.fromkeys(lane(s) for s in runs if lane(s) != "bf16"):
        ratios = [
            (s["jct_mean_ms"] / bf[s["rate"]], s["rate"])
            for s in runs
            if lane(s) == c and s["rate"] in bf
        ]
        if not ratios:
            continue
        worst, r = max(ratios)
        out.append(
            f"{c}: worst mean JCT {worst:.2f}x bf16's (at {_rate(r)} req/s; goal <= "
            f"{NO_LINK_JCT_SLACK:.2f}x: {'met' if worst <= NO_LINK_JCT_SLACK else '**missed**'})"
        )
    return [
        ("No link limit: " + "; ".join(out) + ".")
        if out
        else "No compressed codec ran without a link limit: the no-link goal is not evaluated."
    ]


def _wire_ms(r: dict) -> float:
    """A request's KV bytes on its emulated link, ms."""
    return r["kv_bytes"] * 8 / (r["link_gbps"] * 1e9) * 1e3


def link_queue_ms(rows: list[dict]) -> list[float] | None:
    """Per row (same order): the least time its transfer phase can take on its run's link, a
    FIFO that each pair's sender thread feeds one request after another. A request's layers
    may leave from the start of its prefill (they stream as they are computed), after every
    byte of the requests before it; the phase is counted from the prefill's end. None when
    the rows carry no transfer start times."""
    if not all(_ok(r.get("transfer_start_s")) for r in rows):
        return None
    out = [0.0] * len(rows)
    runs: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        runs.setdefault(_key(r), []).append(i)
    for idx in runs.values():
        free = float("-inf")  # when the link has sent every byte queued so far
        for i in sorted(idx, key=lambda i: rows[i]["transfer_start_s"]):
            r = rows[i]
            end = r["transfer_start_s"]  # the prefill's end
            start = end - (r["prefill_ms"] / 1e3 if _ok(r.get("prefill_ms")) else 0.0)
            free = max(free, start) + _wire_ms(r) / 1e3
            out[i] = max(0.0, free - end) * 1e3
    return out


def _sending_split(rows: list[dict]) -> str:
    """Per lane, the transfer phase's mean split at the prefill side's last hand-off (sweeps
    that record transfer_sending_ms); '' otherwise."""
    parts = []
    for c in dict.fromkeys(lane(r) for r in rows):
        mine = [r for r in rows if lane(r) == c and _ok(r.get("transfer_sending_ms"))]
        if mine:
            sending = sum(r["transfer_sending_ms"] for r in mine) / len(mine)
            total = sum(r["transfer_ms"] for r in mine) / len(mine)
            parts.append(f"{c} {sending:.0f} sending + {total - sending:.0f} receiving")
    if not parts:
        return ""
    return (
        "Mean transfer phase, ms until the prefill side handed over the last layer + after: "
        + "; ".join(parts)
        + "."
    )


def transfer_goals(rows: list[dict]) -> list[str]:
    """The transfer phase against its bounds, per lane: no link <= 50 ms and compressed <= bf16
    (mean); with a link, <= wire bytes / rate + 50 ms per request."""
    if not rows:
        return ["No request rows: the transfer goals are not evaluated."]
    out = []
    free = [r for r in rows if r["link_gbps"] in ("none", None) and _ok(r.get("transfer_ms"))]
    if free:
        lanes = list(dict.fromkeys(lane(r) for r in free))
        mean = {
            c: sum(r["transfer_ms"] for r in free if lane(r) == c)
            / sum(1 for r in free if lane(r) == c)
            for c in lanes
        }
        worst = {c: max(r["transfer_ms"] for r in free if lane(r) == c) for c in lanes}
        longest = int(max(r["prompt_tokens"] for r in free))
        cells = ", ".join(f"{c} mean {mean[c]:.0f} / max {worst[c]:.0f} ms" for c in lanes)
        ok = all(w <= TRANSFER_SLACK_MS for w in worst.values())
        slower = [c for c in lanes if c != "bf16" and "bf16" in mean and mean[c] > mean["bf16"]]
        if "bf16" not in mean or len(lanes) == 1:
            versus = "not evaluated (no bf16 and compressed lane side by side)"
        else:
            versus = "met" if not slower else f"**missed** by {', '.join(slower)}"
        out.append(
            f"Transfer phase, no link (prompts up to {longest} tokens): {cells} (goal "
            f"<= {TRANSFER_SLACK_MS:.0f} ms for every request: "
            f"{'met' if ok else '**missed**'}; compressed never longer than bf16: {versus})."
        )
    linked = [
        r
        for r in rows
        if r["link_gbps"] not in ("none", None)
        and _ok(r.get("transfer_ms"))
        and _ok(r.get("kv_bytes"))
    ]
    if linked:
        own = [_wire_ms(r) for r in linked]
        within = [r["transfer_ms"] <= w + TRANSFER_SLACK_MS for r, w in zip(linked, own)]
        over = max(r["transfer_ms"] - w for r, w in zip(linked, own))
        line = (
            f"Transfer phase over emulated links: {sum(within)}/{len(within)} requests "
            f"within wire bytes / rate + {TRANSFER_SLACK_MS:.0f} ms (worst {over:.0f} ms "
            f"over the wire time; goal all: {'met' if all(within) else '**missed**'})"
        )
        queued = link_queue_ms(linked)
        if queued is not None:
            q_within = [r["transfer_ms"] <= q + TRANSFER_SLACK_MS for r, q in zip(linked, queued)]
            q_over = max(r["transfer_ms"] - q for r, q in zip(linked, queued))
            line += (
                f"; against the least a FIFO link allows (layers leave from the prefill's "
                f"start, after earlier requests' bytes) + {TRANSFER_SLACK_MS:.0f} ms: "
                f"{sum(q_within)}/{len(q_within)} within (worst {q_over:.0f} ms over)"
            )
        split = _sending_split(linked)
        out.append(line + "." + (f" {split}" if split else ""))
    elif any(r["link_gbps"] not in ("none", None) for r in rows):
        out.append(
            "Transfer phase over emulated links: these rows carry no KV bytes (a sweep "
            "from before they were recorded): not evaluated."
        )
    return out


def goals(summary: list[dict], rows: list[dict] | None = None, link=10.0) -> list[str]:
    """Every issue-16 goal this sweep can speak to."""
    return link_goals(summary, rows, link) + no_link_goals(summary) + transfer_goals(rows or [])
