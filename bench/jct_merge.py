"""`python3 -m zipserve.bench.jct_merge --out DIR A B ...`: sweeps of one workload run back to
back on one machine, as one results folder, so `bench report` evaluates the issue's goals for
every codec against the bf16 lanes of whichever sweep ran them.

A GPU call fits only a few lanes (runbook `round14` ran bf16, kivi2, hack2; `jct-16b` the other
four codecs on the same warm machine next), and the report's goals need bf16 in the same folder.
Merging refuses sweeps of different devices, models, workloads (any config key but the lanes,
links and rates) or worker switches (GIL interval, imports during a step: A/B runs), and cells
present in two of them; the merged meta keeps every command, commit
and date, and names its sources. Writes jct_summary.csv, jct_requests.csv, jct_meta.json and the
plots, as a sweep does.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from zipserve.bench import jct_client, jct_plots
from zipserve.bench.jct_sweep import SUMMARY_KEYS

LANE_KEYS = ("codecs", "links", "rates", "decode_kv", "quality_csvs")
"""Config keys that may differ between merged sweeps (the lanes, not the workload)."""


def _rows(path: Path) -> list[dict]:
    """A CSV's rows as written (strings), or none when the file is missing."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _union(lists) -> list:
    """Items of every list, first-seen order, each once."""
    out = []
    for items in lists:
        out += [x for x in items if x not in out]
    return out


META_DEFAULTS = {"kv_inflight_prompts": 1}
"""What a meta field was in sweeps from before it was recorded."""


def _check_same(metas: list[dict], dirs: list[Path]) -> None:
    """ValueError naming the first meta field (device, model, config key) where a sweep differs
    from the first."""
    first = metas[0]
    for meta, d in zip(metas[1:], dirs[1:], strict=True):
        for key in (
            "device",
            "model",
            "gil_switch_ms",
            "import_during_step",
            "kv_inflight_prompts",
        ):
            mine = meta.get(key, META_DEFAULTS.get(key))
            theirs = first.get(key, META_DEFAULTS.get(key))
            if mine != theirs:
                raise ValueError(f"{d}: {key} {mine!r} differs from {dirs[0]}'s {theirs!r}")
        a, b = first.get("config", {}), meta.get("config", {})
        for key in sorted(set(a) | set(b)):
            if key not in LANE_KEYS and a.get(key) != b.get(key):
                raise ValueError(
                    f"{d}: config {key} {b.get(key)!r} differs from {dirs[0]}'s {a.get(key)!r}"
                )


def merge(dirs: list[Path], out: Path) -> Path:
    """Write the sweeps in `dirs` (results folders of `bench jct --sweep`) as one into `out`;
    ValueError when they are fewer than two, differ in device / model / workload, or share a
    cell (codec, decode KV, link, rate)."""
    if len(dirs) < 2:
        raise ValueError("dirs: name at least two sweeps to merge")
    metas = [json.loads((d / "jct_meta.json").read_text()) for d in dirs]
    _check_same(metas, dirs)
    summary, rows, seen = [], [], {}
    for d in dirs:
        cells = _rows(d / "jct_summary.csv")
        if not cells:
            raise ValueError(f"{d}: no jct_summary.csv rows")
        for s in cells:
            key = tuple(s.get(k) for k in SUMMARY_KEYS)
            if key in seen:
                raise ValueError(f"cell {key} is in both {seen[key]} and {d}")
            seen[key] = d
        summary += cells
        rows += _rows(d / "jct_requests.csv")
    config = dict(metas[0].get("config", {}))
    for key in LANE_KEYS:
        config[key] = _union(m.get("config", {}).get(key) or [] for m in metas)
    meta = {
        "device": metas[0]["device"],
        "date_utc": "; ".join(_union([m.get("date_utc")] for m in metas)),
        "model": metas[0]["model"],
        "commit": ", ".join(_union([m.get("commit") or "?"] for m in metas)),
        "command": "\n".join(m.get("command") or "(not recorded)" for m in metas),
        "config": config,
        "merged_from": [str(d) for d in dirs],
        "gil_switch_ms": metas[0].get("gil_switch_ms"),
        "import_during_step": metas[0].get("import_during_step"),
        "kv_inflight_prompts": metas[0].get("kv_inflight_prompts"),
    }
    out.mkdir(parents=True, exist_ok=True)
    jct_client.write_csv(out / "jct_summary.csv", _same_columns(summary))
    if rows:
        jct_client.write_csv(out / "jct_requests.csv", _same_columns(rows))
    (out / "jct_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    jct_plots.plot_all(out, summary, rows, list(config.get("quality_csvs") or []))
    return out


def _same_columns(rows: list[dict]) -> list[dict]:
    """Rows with every column any of them has (first-seen order), empty where one lacks it."""
    columns = _union(list(r) for r in rows)
    return [{c: r.get(c, "") for c in columns} for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+", type=Path, help="results folders of bench jct --sweep")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        out = merge(a.sweeps, a.out)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    print(f"wrote {out}/jct_summary.csv, jct_requests.csv, jct_meta.json and the plots")


if __name__ == "__main__":
    main()
