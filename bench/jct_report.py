"""`zipserve bench report`: regenerate the JCT results page from sweep outputs.

Reads each results folder written by `zipserve bench jct --sweep` (jct_summary.csv,
jct_meta.json, the PNGs) and writes one Markdown page (default bench/JCT_RESULTS.md, linked
from the hand-written bench/RESULTS.md, which this command never touches): per folder the
device, date, model, commit and exact command, per link a table of every run, the highest rate
each codec sustains, the issue-16 goals (bench/jct_goals.py) the sweep can speak to, the
perplexity cost per codec, and the plots. With `readme`, the block between the
`<!-- jct-results:begin -->` and `<!-- jct-results:end -->` markers of README.md is replaced by
the headline table of the first folder. The prefix-caching section (`bench cache-report`,
bench/cache_report.py) is kept at the end of the page as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from zipserve.bench.cache_report import kept_block
from zipserve.bench.jct_goals import _key, _rate, _s, goals, highest_sustained
from zipserve.bench.jct_plots import (
    _links,
    _ok,
    _rate_x,
    base_codec,
    lane,
    link_label,
    load_csv,
    quality_by_codec,
)

BEGIN, END = "<!-- jct-results:begin -->", "<!-- jct-results:end -->"
PNGS = ("jct_vs_rate.png", "jct_cdf.png", "jct_phases.png", "jct_quality.png")


def _ms(ms) -> str:
    return f"{ms:.0f}" if _ok(ms) else "—"


def ttft_coverage(s: dict, rows: list[dict]) -> tuple[int, int]:
    """(requests of run `s` with a measured TTFT, requests that completed). Without request rows
    the summary is taken at its word."""
    ok = [r for r in rows if _key(r) == _key(s) and r.get("status") == "ok"]
    if not ok:
        return int(s["ok"]), int(s["ok"])
    return sum(1 for r in ok if _ok(r.get("ttft_ms"))), len(ok)


def headline(summary: list[dict]) -> list[str]:
    """Highest sustained rate and mean JCT at bf16's highest sustained rate, per codec x link
    (a sweep without bf16: at the highest rate every codec of the sweep sustained there)."""
    links = _links(summary)
    codecs = list(dict.fromkeys(lane(s) for s in summary))
    lines = [
        "| codec | "
        + " | ".join(f"{link_label(g)}: max sustained req/s | mean JCT s" for g in links)
        + " |",
        "|---|" + "---|---|" * len(links),
    ]
    for c in codecs:
        cells = []
        for g in links:
            hs = highest_sustained(summary, c, g)
            ref = highest_sustained(summary, "bf16", g)
            if ref is None and not any(base_codec(lane(s)) == "bf16" for s in summary):
                tops = [highest_sustained(summary, x, g) for x in codecs]
                ref = None if None in tops else min(tops, key=_rate_x)
            s = (
                next(
                    (
                        s
                        for s in summary
                        if lane(s) == c and s["link_gbps"] == g and s["rate"] == ref
                    ),
                    None,
                )
                if ref is not None
                else None
            )
            cells += [
                "none" if hs is None else _rate(hs),
                "—" if s is None else f"{_s(s['jct_mean_ms'])} @ {_rate(ref)}/s",
            ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


SHARED_PREFIX_WORKLOADS = ("shared-prefix", "multiturn")
"""Workloads whose requests share prefixes by design: cache hits there are the point."""


def cache_hit_cells(rows: list[dict], workload: str | None) -> list[str]:
    """'lane link L rate R: n/m requests' for each cell of a workload without shared prefixes in
    which some request found prompt tokens cached (rows without the column: none)."""
    if workload in SHARED_PREFIX_WORKLOADS:
        return []
    cells: dict[tuple, list[int]] = {}
    for r in rows:
        key = (lane(r), r.get("link_gbps"), r.get("rate"))
        hit = _ok(r.get("cached_tokens")) and r["cached_tokens"] > 0
        counts = cells.setdefault(key, [0, 0])
        counts[0] += bool(hit)
        counts[1] += 1
    return [
        f"{name} link {link} rate {_rate(rate)}: {n}/{m} requests"
        for (name, link, rate), (n, m) in cells.items()
        if n
    ]


def section(results: Path, page_dir: Path, quality_csvs: list[str] | None = None) -> list[str]:
    """One sweep's part of the page; quality_csvs (bench quality CSVs) replace the ones the
    sweep recorded."""
    summary = load_csv(results / "jct_summary.csv")
    meta = json.loads((results / "jct_meta.json").read_text())
    cfg = meta.get("config", {})
    rel = _relative(results, page_dir)
    out = [
        f"## {meta['device']} — {meta['date_utc']}",
        "",
        f"Model `{meta['model']}`, commit `{meta.get('commit') or '?'}`, workload "
        f"`{cfg.get('workload')}` ({cfg.get('num_requests')} requests per run, scale "
        f"{cfg.get('scale')}, seed {cfg.get('seed')}, each run bounded to "
        f"{cfg.get('max_seconds')} s). "
        + (
            f"Commands ({len(meta['merged_from'])} sweeps run back to back on this device, "
            "merged by `python3 -m zipserve.bench.jct_merge`):"
            if meta.get("merged_from")
            else "Command:"
        ),
        "",
        "```bash",
        meta.get("command") or "(not recorded)",
        "```",
        "",
        f"Raw: [{rel}/jct_summary.csv]({rel}/jct_summary.csv), "
        f"[jct_requests.csv]({rel}/jct_requests.csv). Times in seconds (phases in ms); "
        "'sustained' = every request finished and neither the wait (queue + transfer + "
        "decode_queue) nor the JCT of the last quarter of the run grew past 1.5x the second "
        "quarter's (+50 ms). 'link busy': the emulated link transmitting over the run; "
        "'hand-off' (sweeps from session 12 on): handing messages to the transport after "
        "their slot (until session 13 the link carried nothing meanwhile; since then the next "
        "message's slot runs on); 'waiting for acks' (from session 13 on): the part of it the "
        "transport waited for the decode side to give shared buffers back (CUDA IPC's "
        "in-flight cap).",
        "",
        "### Headline",
        "",
    ]
    if meta.get("runs_planned"):
        out += [
            f"**A partial sweep:** {meta['runs_done']} of its {meta['runs_planned']} runs finished "
            "before it was cut short (a time limit); the tables hold those runs only.",
            "",
        ]
    if meta.get("import_during_step") is False:
        out += [
            "The decode workers of this sweep imported received layers between steps only "
            "(`ZIPSERVE_IMPORT_DURING_STEP=0`, an A/B run).",
            "",
        ]
    if (meta.get("kv_inflight_prompts") or 1) != 1:
        out += [
            f"The prefill workers of this sweep let {meta['kv_inflight_prompts']} prompts' KV wait "
            "unacknowledged instead of one (`ZIPSERVE_KV_INFLIGHT_PROMPTS`, an A/B run).",
            "",
        ]
    out += headline(summary) + [""]
    if meta["device"].startswith("CPU"):
        out += [
            "On the CPU the compressed codecs attend through the torch references of their "
            "Triton kernels, so their prefill/decode times say nothing about GPU speed; this "
            "run shows the benchmark working, not the codecs' worth.",
            "",
        ]
    rows = (
        load_csv(results / "jct_requests.csv") if (results / "jct_requests.csv").is_file() else []
    )
    hits = cache_hit_cells(rows, cfg.get("workload"))
    if hits:
        out += [
            f"**Prefix-cache hits in a workload without shared prefixes** ({'; '.join(hits)}): "
            "those requests were prefilled and sent only in part, so their cells measure the "
            "cache, not the link (sweeps before commit 866ff03 replayed the same prompts in "
            "every cell of a running system). Read only the cells not named here.",
            "",
        ]
    out += ["### Goals (issue 16)", ""] + [f"- {g}" for g in goals(summary, rows)] + [""]
    for g in _links(summary):
        out += [
            f"### Link {link_label(g)}",
            "",
            "| codec | rate | ok/sent | mean JCT | p99 JCT | mean TTFT | p99 TTFT | link busy "
            "| sustained | queue | prefill | transfer | decode_queue | decode | client HTTP |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        partial_ttft = []
        for s in (s for s in summary if s["link_gbps"] == g):
            http = sum(s[k] for k in ("http_in_mean_ms", "tail_mean_ms") if _ok(s[k]))
            busy = f"{100 * s['link_busy']:.0f}%" if _ok(s.get("link_busy")) else "—"
            if _ok(s.get("link_handoff")):  # hand-offs after a slot
                acks = s.get("link_ack_wait")
                of_it = f", {100 * acks:.0f}% waiting for acks" if _ok(acks) else ""
                busy += f" (+{100 * s['link_handoff']:.0f}% hand-off{of_it})"
            timed, ok = ttft_coverage(s, rows)
            ttft = (_s(s["ttft_mean_ms"]), _s(s["ttft_p99_ms"]))
            if timed < ok:
                partial_ttft.append(f"{lane(s)} at {_rate(s['rate'])}/s: {timed}/{ok}")
                ttft = ("—", "—")
            out.append(
                f"| {lane(s)} | {_rate(s['rate'])} | {int(s['ok'])}/{int(s['sent'])} | "
                f"{_s(s['jct_mean_ms'])} | {_s(s['jct_p99_ms'])} | {ttft[0]} "
                f"| {ttft[1]} | {busy} | "
                f"{'yes' if s['sustained'] is True else '**no**'} | "
                f"{_ms(s['queue_mean_ms'])} | {_ms(s['prefill_mean_ms'])} | "
                f"{_ms(s['transfer_mean_ms'])} | {_ms(s['decode_queue_mean_ms'])} | "
                f"{_ms(s['decode_mean_ms'])} | {_ms(http)} |"
            )
        out.append("")
        if partial_ttft:
            out += [
                "TTFT not shown where the client timed the first token of only some requests "
                "(before the fix the server sent a chunk only for tokens with text, and a random "
                "model's tokens mostly decode to none): " + "; ".join(partial_ttft) + ".",
                "",
            ]
    quality_csvs = quality_csvs or cfg.get("quality_csvs") or []
    ppl = quality_by_codec(quality_csvs)
    codecs = list(dict.fromkeys(lane(s) for s in summary))
    out += ["### Perplexity cost", ""]
    if ppl:
        out += ["| codec | perplexity vs bf16 |", "|---|---|"]
        cost = {c: ppl.get(base_codec(c)) for c in codecs}  # dense lanes: the codec's values
        out += [
            f"| {c} | {'no quality data' if v is None else f'+{v:.2f}%'} |" for c, v in cost.items()
        ]
        out += [
            "",
            f"From {', '.join(quality_csvs)} (`zipserve bench quality`, the "
            f"reference model: perplexity is a property of the model, not measured on "
            f"the sweep's model).",
        ]
    else:
        out.append("No quality CSV was found for this sweep (run `zipserve bench quality`).")
    out.append("")
    for png in PNGS:
        if (results / png).is_file():
            out += [f"![{png}]({rel}/{png})", ""]
    return out


def _relative(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


def write(
    results_dirs: list[Path],
    page: Path,
    readme: Path | None = None,
    quality_csvs: list[str] | None = None,
) -> Path:
    for d in results_dirs:
        for f in ("jct_summary.csv", "jct_meta.json"):
            if not (d / f).is_file():
                raise ValueError(
                    f"results: {d / f} is missing (run `zipserve bench jct --sweep "
                    f"--out {d}` first)"
                )
    lines = [
        "# JCT benchmark results",
        "",
        "Generated by `python3 -m zipserve bench report` from the sweep CSVs named below; "
        "do not edit by hand (rerun the command). Hand-written results: "
        "[RESULTS.md](RESULTS.md).",
        "",
    ]
    for d in results_dirs:
        lines += section(d, page.parent, quality_csvs)
    kept = kept_block(page)  # bench cache-report's section stays
    if kept:
        lines += ["", kept]
    page.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {page}")
    if readme is not None:
        _update_readme(readme, results_dirs[0], page)
    return page


def _update_readme(readme: Path, results: Path, page: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"readme: {readme} has no {BEGIN} ... {END} block to fill")
    meta = json.loads((results / "jct_meta.json").read_text())
    summary = load_csv(results / "jct_summary.csv")
    rel = _relative(results, readme.parent)
    block = [
        BEGIN,
        f"{meta['device']}, {meta['date_utc']}, model `{meta['model']}`, workload "
        f"`{meta.get('config', {}).get('workload')}`; full tables, goals and command: "
        f"[{_relative(page, readme.parent)}]({_relative(page, readme.parent)}).",
        "",
    ]
    block += headline(summary) + ["", f"![JCT vs rate]({rel}/jct_vs_rate.png)", END]
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + "\n".join(block) + rest.split(END, 1)[1])
    print(f"updated the JCT block of {readme}")
