"""Plots of a JCT sweep (PNG, via bench/plotting.py), from its summary and per-request rows:

- jct_vs_rate.png: mean and p99 JCT against arrival rate, one line per codec, one row per link;
  runs that did not sustain their rate (failures, cut requests or a growing queue) are crosses.
- jct_cdf.png: CDF of JCT per codec, one panel per (link, rate).
- jct_phases.png: mean phase breakdown per codec (stacked: queue, prefill, transfer,
  decode_queue, decode, and the client's HTTP overhead), one panel per (link, rate).
- jct_quality.png: perplexity cost per codec (from `zipserve bench quality` CSVs) beside its mean
  JCT gain over bf16 at the highest rate bf16 sustained on each link.
"""

from __future__ import annotations

import csv
from pathlib import Path

from zipserve.bench.plotting import pyplot

PHASE_COLUMNS = ("queue_ms", "prefill_ms", "transfer_ms", "decode_queue_ms", "decode_ms")


def _num(v):
    if isinstance(v, str):
        if v in ("True", "False"):
            return v == "True"
        try:
            return float(v)
        except ValueError:
            return v
    return v


def load_csv(path: Path) -> list[dict]:
    """A CSV as dicts, numbers and booleans converted."""
    with open(path, newline="") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def link_label(g) -> str:
    return "unlimited" if g in ("none", None) else f"{g:g} Gb/s"


def _links(summary: list[dict]) -> list:
    seen = []
    for s in summary:
        if s["link_gbps"] not in seen:
            seen.append(s["link_gbps"])
    return seen


def lane(s: dict) -> str:
    """A run's label: its codec, with "/dense" (or "/auto"...) when its decode workers did not
    keep the codec's pages (decode_kv; bf16 is dense in every mode). Rows from before decode_kv
    existed have none: compressed."""
    mode = s.get("decode_kv") or "compressed"
    return s["codec"] if mode == "compressed" or s["codec"] == "bf16" else f"{s['codec']}/{mode}"


def base_codec(label: str) -> str:
    """The codec of a lane label (its wire form and quality: dense holds the codec's values)."""
    return label.split("/")[0]


def _codecs(summary: list[dict]) -> list[str]:
    return list(dict.fromkeys(lane(s) for s in summary))


def _rates(summary: list[dict]) -> list:
    return list(dict.fromkeys(s["rate"] for s in summary))


def _rate_x(r) -> float:
    return float(r) if isinstance(r, (int, float)) else 0.0


def quality_by_codec(paths: list[str]) -> dict[str, float]:
    """Perplexity increase over bf16 (%) per codec from quality CSVs (later files win)."""
    from zipserve.bench.jct_sweep import resolve_repo_path

    out: dict[str, float] = {}
    for p in map(resolve_repo_path, paths):
        if not p.is_file():
            continue
        for row in load_csv(p):
            if _ok(row.get("ppl_increase_pct")):
                out[row["codec"]] = row["ppl_increase_pct"]
    return out


def bf16_reference_rate(summary: list[dict], link) -> float | str | None:
    """The highest rate bf16 sustained on `link` (its lowest rate when it sustained none)."""
    runs = [s for s in summary if lane(s) == "bf16" and s["link_gbps"] == link]
    if not runs:
        return None
    good = [s["rate"] for s in runs if s["sustained"] is True]
    return max(good, key=_rate_x) if good else min((s["rate"] for s in runs), key=_rate_x)


def plot_all(
    out_dir: Path, summary: list[dict], rows: list[dict], quality_csvs: list[str]
) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    summary = [{k: _num(v) for k, v in s.items()} for s in summary]
    rows = [{k: _num(v) for k, v in r.items()} for r in rows]
    paths = [
        _vs_rate(plt, out_dir, summary),
        _cdf(plt, out_dir, summary, rows),
        _phases(plt, out_dir, summary),
        _quality(plt, out_dir, summary, quality_csvs),
    ]
    return paths


def _grid(plt, nrows: int, ncols: int, w: float = 4.0, h: float = 3.0):
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    return fig, axes


def _vs_rate(plt, out_dir: Path, summary: list[dict]) -> Path:
    links, codecs = _links(summary), _codecs(summary)
    fig, axes = _grid(plt, len(links), 2)
    for i, g in enumerate(links):
        for j, (key, title) in enumerate((("jct_mean_ms", "mean JCT"), ("jct_p99_ms", "p99 JCT"))):
            ax = axes[i][j]
            for k, c in enumerate(codecs):
                runs = sorted(
                    (s for s in summary if lane(s) == c and s["link_gbps"] == g),
                    key=lambda s: _rate_x(s["rate"]),
                )
                xs = [_rate_x(s["rate"]) for s in runs]
                ys = [s[key] / 1e3 if _ok(s[key]) else float("nan") for s in runs]
                (line,) = ax.plot(xs, ys, "-", label=c, color=f"C{k}")
                for x, y, s in zip(xs, ys, runs):
                    ax.plot(
                        [x], [y], "o" if s["sustained"] is True else "x", color=line.get_color()
                    )
            ax.set_title(f"{title}, link {link_label(g)}", fontsize=9)
            ax.set_xlabel("arrival rate (req/s)")
            ax.set_ylabel("seconds")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("JCT vs arrival rate (x: rate not sustained)", fontsize=10)
    fig.tight_layout()
    path = out_dir / "jct_vs_rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(plt, out_dir: Path, summary: list[dict], rows: list[dict]) -> Path:
    links, rates, codecs = _links(summary), _rates(summary), _codecs(summary)
    fig, axes = _grid(plt, len(links), len(rates), 3.6, 2.8)
    for i, g in enumerate(links):
        for j, r in enumerate(rates):
            ax = axes[i][j]
            for k, c in enumerate(codecs):
                v = sorted(
                    x["jct_ms"] / 1e3
                    for x in rows
                    if lane(x) == c
                    and x["link_gbps"] == g
                    and x["rate"] == r
                    and x["status"] == "ok"
                )
                if v:
                    ax.step(
                        v,
                        [(n + 1) / len(v) for n in range(len(v))],
                        where="post",
                        label=c,
                        color=f"C{k}",
                    )
            ax.set_title(
                f"{link_label(g)}, {r if isinstance(r, str) else f'{r:g} req/s'}", fontsize=9
            )
            ax.set_xlabel("JCT (s)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "jct_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _phases(plt, out_dir: Path, summary: list[dict]) -> Path:
    links, rates, codecs = _links(summary), _rates(summary), _codecs(summary)
    fig, axes = _grid(plt, len(links), len(rates), max(3.6, 0.7 * len(codecs) + 1), 3.0)
    names = [c.removesuffix("_ms") for c in PHASE_COLUMNS] + ["client HTTP"]
    for i, g in enumerate(links):
        for j, r in enumerate(rates):
            ax = axes[i][j]
            bottom = [0.0] * len(codecs)
            for p, name in enumerate(names):
                vals = []
                for c in codecs:
                    s = next(
                        (
                            s
                            for s in summary
                            if lane(s) == c and s["link_gbps"] == g and s["rate"] == r
                        ),
                        None,
                    )
                    if s is None:
                        vals.append(0.0)
                    elif name == "client HTTP":
                        vals.append(
                            sum(s[k] for k in ("http_in_mean_ms", "tail_mean_ms") if _ok(s[k]))
                            / 1e3
                        )
                    else:
                        v = s[f"{name}_mean_ms"]
                        vals.append(v / 1e3 if _ok(v) else 0.0)
                ax.bar(range(len(codecs)), vals, bottom=bottom, label=name, color=f"C{p}")
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_xticks(range(len(codecs)), codecs, rotation=30, fontsize=7)
            ax.set_title(
                f"{link_label(g)}, {r if isinstance(r, str) else f'{r:g} req/s'}", fontsize=9
            )
            ax.set_ylabel("mean seconds")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("where a job's time goes (mean per phase)", fontsize=10)
    fig.tight_layout()
    path = out_dir / "jct_phases.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def jct_gains(summary: list[dict]) -> dict:
    """{link: (reference rate, {codec: mean-JCT reduction vs bf16 in %})} at the highest rate
    bf16 sustained on that link."""
    out = {}
    for g in _links(summary):
        r = bf16_reference_rate(summary, g)
        if r is None:
            continue
        at = {
            lane(s): s["jct_mean_ms"]
            for s in summary
            if s["link_gbps"] == g and s["rate"] == r and _ok(s["jct_mean_ms"])
        }
        if "bf16" in at:
            out[g] = (r, {c: 100.0 * (1 - v / at["bf16"]) for c, v in at.items()})
    return out


def _quality(plt, out_dir: Path, summary: list[dict], quality_csvs: list[str]) -> Path:
    codecs = _codecs(summary)
    ppl = quality_by_codec(quality_csvs)
    gains = jct_gains(summary)
    fig, axes = _grid(plt, 1, 2, max(4.5, 0.8 * len(codecs) + 1.5), 3.4)
    ax = axes[0][0]
    have = [c for c in codecs if base_codec(c) in ppl]
    if have:
        ax.bar(range(len(have)), [ppl[base_codec(c)] for c in have], color="C3")
        ax.set_xticks(range(len(have)), have, rotation=30, fontsize=8)
        missing = [c for c in codecs if base_codec(c) not in ppl]
        ax.set_title(
            "perplexity increase vs bf16 (%)"
            + (f"\nno quality data: {', '.join(missing)}" if missing else ""),
            fontsize=8,
        )
    else:
        ax.text(
            0.5,
            0.5,
            "no quality CSV found\n(run `zipserve bench quality`)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_title("perplexity increase vs bf16 (%)", fontsize=9)
    ax = axes[0][1]
    width = 0.8 / max(1, len(gains))
    for n, (g, (r, by_codec)) in enumerate(gains.items()):
        xs = [i + n * width for i in range(len(codecs))]
        ax.bar(
            xs,
            [by_codec.get(c, 0.0) for c in codecs],
            width,
            label=f"{link_label(g)} @ {r if isinstance(r, str) else f'{r:g}/s'}",
        )
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(codecs))], codecs, rotation=30, fontsize=8
    )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("mean JCT reduction vs bf16 (%)\nat the highest rate bf16 sustained", fontsize=8)
    if gains:
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "jct_quality.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
