"""`zipserve bench cache-report`: the prefix-caching section of the JCT results page, from sweeps
of a conversation workload (`bench jct --sweep --workload multiturn`, with and without
`--engine-option prefix_caching=false`).

Per run (codec, decode_kv, caching off / on / on with local prefill; over every seed's sweep,
then per seed): turns completed, mean JCT and TTFT and both against the same lane with caching
off, KV bytes sent and not sent over all turns, the prefill side's hit rate (prompt tokens taken
from its prefix cache / prompt tokens), the prompt tokens the decode side held and how many turns
it prefilled itself. Per turn: the same as means over every seed's conversations. The section
lives between the `<!-- prefix-cache:begin -->` and `<!-- prefix-cache:end -->` markers of the
page: it is replaced there, or appended when the page has none; `bench report` keeps it when it
regenerates the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from zipserve.bench.jct_plots import _ok, lane, load_csv

BEGIN, END = "<!-- prefix-cache:begin -->", "<!-- prefix-cache:end -->"


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _f(x, fmt: str = ".0f") -> str:
    return format(x, fmt) if _ok(x) else "—"


def _kb(x) -> str:
    return f"{x / 1e3:.0f}" if _ok(x) else "—"


def _run_label(r: dict) -> tuple[str, str, str]:
    """(codec lane, caching: on / off / on, local prefill <= N, conversation rate) of a row."""
    caching = str(r.get("prefix_caching", "on"))
    local = r.get("local_prefill_tokens")
    if caching == "on" and _ok(local):
        caching = f"on, local ≤ {local:.0f}" if local else "on, no local"
    return lane(r), caching, f"{r.get('rate')}".removesuffix(".0")


def _totals(reqs: list[dict]) -> dict:
    """Over the completed turns of one run."""
    ok = [r for r in reqs if r.get("status") == "ok"]

    def total(key: str) -> float:
        vals = [r[key] for r in ok if _ok(r.get(key))]
        return sum(vals) if vals else float("nan")

    def mean(key: str) -> float:
        vals = [r[key] for r in ok if _ok(r.get(key))]
        return sum(vals) / len(vals) if vals else float("nan")

    prompt = total("prompt_tokens")
    return {
        "ok": len(ok),
        "sent": sum(1 for r in reqs if r.get("status") != "not_sent"),
        "jct": mean("jct_ms"),
        "ttft": mean("ttft_ms"),
        "kv_bytes": total("kv_bytes"),
        "kv_bytes_not_sent": total("kv_bytes_not_sent"),
        "hit_rate": total("cached_tokens") / prompt if _ok(prompt) and prompt else float("nan"),
        "held": total("kv_cached_tokens"),
        "cached": total("cached_tokens"),
        "prompt": prompt,
        "local": sum(1 for r in ok if r.get("local_prefill") in (True, "True", 1)),
    }


def _row(label: str, t: dict, off: dict | None) -> str:
    ratio = (
        f"{t['jct'] / off['jct']:.2f}x / {t['ttft'] / off['ttft']:.2f}x"
        if off and _ok(off["jct"]) and off["jct"] and _ok(off["ttft"]) and off["ttft"]
        else "—"
    )
    return (
        f"| {label} | {t['ok']}/{t['sent']} | {_f(t['jct'])} | {_f(t['ttft'])} | {ratio} | "
        f"{_kb(t['kv_bytes'])} | {_kb(t['kv_bytes_not_sent'])} | "
        f"{_f(100 * t['hit_rate'], '.1f')}% | {_f(t['held'])} of {_f(t['prompt'])} | "
        f"{t['local']} |"
    )


RUN_HEADER = [
    "| mean JCT ms | mean TTFT ms | JCT / TTFT vs caching off | KV sent KB | KV not sent KB "
    "| prefill hit rate | prompt tokens held by decode | prefilled on decode |",
]


def section(results_dirs: list[Path], page_dir: Path) -> list[str]:
    metas, reqs = [], []
    for d in results_dirs:
        for f in ("jct_requests.csv", "jct_meta.json"):
            if not (d / f).is_file():
                raise ValueError(
                    f"results: {d / f} is missing (run `zipserve bench jct --sweep --workload "
                    f"multiturn --out {d}` first)"
                )
        meta = json.loads((d / "jct_meta.json").read_text())
        metas.append((d, meta))
        seed = meta.get("config", {}).get("seed")
        reqs += [{**r, "_seed": seed} for r in load_csv(d / "jct_requests.csv")]
    labels = list(dict.fromkeys(_run_label(r) for r in reqs))
    seeds = list(dict.fromkeys(r["_seed"] for r in reqs))
    first = metas[0][1]
    cfg = first.get("config", {})
    commits = ", ".join(dict.fromkeys(f"`{m.get('commit') or '?'}`" for _, m in metas))
    dates = sorted({m["date_utc"] for _, m in metas})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"

    def of(label, seed=None, turn=None) -> list[dict]:
        return [
            r
            for r in reqs
            if _run_label(r) == label
            and (seed is None or r["_seed"] == seed)
            and (turn is None or r.get("turn") == turn)
        ]

    def off_of(label) -> tuple:
        return (label[0], "off", label[2])

    out = [
        BEGIN,
        f"## Prefix caching, multi-turn conversations — {first['device']} — {when}",
        "",
        f"Model `{first['model']}`, commit {commits}, workload "
        f"`{cfg.get('workload')}` ({cfg.get('num_requests')} conversations of 4-8 turns per run, "
        f"scale {cfg.get('scale')}, seeds {', '.join(map(str, seeds))}, rates "
        f"{cfg.get('rates')} conversations/s); each turn's prompt is the whole history, sent "
        "once the previous answer is in. Written by `python3 -m zipserve bench cache-report`. "
        "Commands:",
        "",
        "```bash",
        *[m.get("command") or "(not recorded)" for _, m in metas],
        "```",
        "",
        "Raw: "
        + ", ".join(
            f"[{_relative(d, page_dir)}/jct_requests.csv]({_relative(d, page_dir)}/"
            "jct_requests.csv)"
            for d, _ in metas
        )
        + " (jct_turns.csv beside each). Prefix caching: off = `--engine-option "
        "prefix_caching=false`; on = prefill-side reuse + delta transfer (`no local`: "
        "`--local-prefill-tokens 0`; `local ≤ N`: the decode worker computes a rest of at most "
        "N tokens itself). KV bytes are what crossed the emulated link (the engine's dtype is "
        "fp32 on the CPU); a turn prefilled on the decode worker sends nothing and counts "
        "nothing as not sent.",
        "",
        "### All seeds",
        "",
        "| codec | prefix caching | conv/s | turns ok/sent " + RUN_HEADER[0],
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        off = _totals(of(off_of(label))) if label[1] != "off" else None
        out.append(_row(" | ".join(label), _totals(of(label)), off))
    out += [
        "",
        "### Per seed",
        "",
        "| codec | prefix caching | conv/s | seed | turns ok/sent " + RUN_HEADER[0],
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        for seed in seeds:
            rows = of(label, seed)
            if rows:
                off = _totals(of(off_of(label), seed)) if label[1] != "off" else None
                out.append(_row(" | ".join(label) + f" | {seed}", _totals(rows), off))
    out += [
        "",
        "### Per turn (mean over the conversations of every seed that reached it)",
        "",
        "| codec | prefix caching | conv/s | turn | n | JCT ms | TTFT ms | prompt tokens "
        "| cached (prefill) | held (decode) | KV sent KB | KV not sent KB | local |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        turns = sorted({r["turn"] for r in of(label) if _ok(r.get("turn"))})
        for turn in turns:
            t = _totals(of(label, turn=turn))
            if not t["ok"]:
                continue
            n = t["ok"]
            out.append(
                f"| {' | '.join(label)} | {int(turn)} | {n} | {_f(t['jct'])} | {_f(t['ttft'])} "
                f"| {_f(t['prompt'] / n)} | {_f(t['cached'] / n)} | {_f(t['held'] / n)} | "
                f"{_kb(t['kv_bytes'] / n)} | {_kb(t['kv_bytes_not_sent'] / n)} | {t['local']} |"
            )
    return out + ["", END]


def write(results_dirs: list[Path], page: Path) -> Path:
    """Replace (or append) the page's prefix-cache block."""
    block = "\n".join(section(results_dirs, page.parent))
    text = page.read_text() if page.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    page.write_text(text)
    print(f"wrote the prefix-cache section of {page}")
    return page


def kept_block(page: Path) -> str | None:
    """The page's prefix-cache block, for `bench report` to keep when it rewrites the page."""
    if not page.is_file():
        return None
    text = page.read_text()
    if BEGIN not in text or END not in text:
        return None
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
