"""kivi2 at hack2mix's bytes (issue 19): does hack2mix beat a KIVI of the same size?

`python3 -m zipserve.bench.kivi_equal_bytes [--windows 4 --offset 0]`

hack2mix (HACK 2-bit, one layer in 4 bits by the model's kvbits.json) stores 688 B/token on the
reference model, kivi2 576. This measures, with bench/quality_breakdown.py's forward on held-out
windows (each codec's own encode + dequantize, the decode-time view), KIVI variants that spend
about as many bytes or more:

  * kivi2 with hack2mix's own per-layer upgrade (its 4-bit layers in kivi4),
  * kivi2 with the layer the plan would upgrade next in kivi4 too (more bytes than hack2mix),
  * kivi2 with K quantized in token groups of 16 instead of 32 (more scales),
  * kivi2 with K token groups and V channel groups of 16 (more bytes than hack2mix),

beside hack2, kivi2 and hack2mix themselves. The smaller-group KIVIs are registered here under
names of their own (`kivi2-k16`, `kivi2-k16v16`) for this run only: only their encode and
dequantize run (KIVI's decode kernels take groups of 32).

`--clip C` (issue 19): every codec of the run, HACK and KIVI alike, quantizes its 2-bit groups
over their [min, max] shrunk by C of the width on each side (compress/quantize.py; 4-bit groups
keep min/max, as HACK's encoder does by default). 0.1 is HACK's shipped encoder; 0 is the min/max
rule of both (HACK before the clip, and the shipped KIVI). Same bytes either way.

Prints one markdown table (perplexity, vs bf16, bytes/token, % of bf16) and writes
kivi_equal_bytes_clip<C>_windows<a>-<b>.csv under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from zipserve.bench import quality_breakdown as qb
from zipserve.compress.codecs import CodecEntry, register, unregister
from zipserve.compress.hack import HackCodec
from zipserve.compress.kivi import KiviCodec
from zipserve.compress.kvbits import KVBITS_FILE, HackMixedCodec
from zipserve.kernels.hack_encode import CLIP


class KiviGroups(KiviCodec):
    """KIVI with other group sizes: K per channel over `token_group` tokens, V per token over
    `channel_group` channels (encode / dequantize only)."""

    def __init__(
        self, num_kv_heads, page_size, head_dim, bits, token_group, channel_group, clip=0.0
    ):
        self.token_group, self.channel_group = token_group, channel_group
        super().__init__(num_kv_heads, page_size, head_dim, bits, clip)
        self.name = f"kivi{bits}-k{token_group}v{channel_group}"


GROUPED = {"kivi2-k16": (16, 32), "kivi2-k16v16": (16, 16)}


def _register() -> None:
    for name, (tg, cg) in GROUPED.items():
        register(
            CodecEntry(
                name,
                KiviGroups,
                build=lambda r, tg=tg, cg=cg: KiviGroups(
                    r.num_kv_heads, r.page_size, r.head_dim, 2, tg, cg
                ),
            )
        )


def _unregister() -> None:
    for name in GROUPED:
        unregister(name)


def clipped_codecs(model: str, clip: float):
    """(config, page_size) -> every codec of the run with 2-bit groups clipped by `clip` (4-bit:
    min/max), for quality_breakdown.run."""

    def build(config, page_size):
        kvh, d = config.num_kv_heads, config.head_dim
        c = {2: clip, 4: 0.0}
        out = {f"kivi{b}": KiviCodec(kvh, page_size, d, b, c[b]) for b in (2, 4)}
        out |= {f"hack{b}": HackCodec(kvh, page_size, d, b, clip=c[b]) for b in (2, 4)}
        out["hack2mix"] = HackMixedCodec.load(kvh, page_size, d, model, clip=c)
        for name, (tg, cg) in GROUPED.items():
            out[name] = KiviGroups(kvh, page_size, d, 2, tg, cg, clip)
        return out

    return build


def variants(num_layers: int, upgraded: list[int], next_layer: int) -> list[qb.Variant]:
    """The KIVI variants (base codec kivi2); `upgraded`: hack2mix's 4-bit layers."""
    all_layers = range(num_layers)
    v = [
        qb.Variant(
            f"kivi2, layers {upgraded} in kivi4 (hack2mix's upgrade)",
            "kivi",
            overrides=tuple((i, "kivi4", "KV", None) for i in upgraded),
        ),
        qb.Variant(
            f"kivi2, layers {sorted(upgraded + [next_layer])} in kivi4",
            "kivi",
            overrides=tuple((i, "kivi4", "KV", None) for i in upgraded + [next_layer]),
        ),
    ]
    for name, (tg, cg) in GROUPED.items():
        v.append(
            qb.Variant(
                f"kivi2, K token groups {tg}, V channel groups {cg}",
                "kivi",
                overrides=tuple((i, name, "KV", None) for i in all_layers),
            )
        )
    return v


def run(
    model: str = qb.DEFAULT_MODEL,
    n_windows: int = 4,
    offset: int = 0,
    context: int = 1024,
    stride: int = 512,
    text_dir: str | None = None,
    out: Path | None = None,
    clip: float = CLIP[2],
) -> list[dict]:
    plan = json.loads((Path(model) / KVBITS_FILE).read_text())
    upgraded = [i for i, b in enumerate(plan["bits"]) if b == 4]
    # the layer the plan would upgrade next: the largest measured gain not taken
    gains = sorted(plan["sensitivity"], key=lambda r: -r["gain"])
    next_layer = next(r["layer"] for r in gains if r["layer"] not in upgraded)
    _register()
    try:
        rows = []
        for codec, extra in (
            ("kivi2", variants(len(plan["bits"]), upgraded, next_layer)),
            ("hack2", []),
            ("hack2mix", []),
        ):
            got, _, _ = qb.run(
                codec,
                model,
                n_windows,
                context,
                stride,
                text_dir,
                None,
                (),
                extra=extra,
                offset=offset,
                codecs=clipped_codecs(model, clip),
            )
            rows += [dict(r, base_codec=codec, clip=clip) for r in (got if not rows else got[1:])]
    finally:
        _unregister()
    bf16 = rows[0]["bytes_4k"]
    print(f"\n2-bit groups clipped by {clip} a side (HACK and KIVI; 0: min/max)")
    print("\n| codec | perplexity | vs bf16 | B/token | of bf16's |\n|---|---|---|---|---|")
    for r in rows:
        name = r["base_codec"] if r["variant"] == "all (codec)" else r["variant"]
        if r["variant"].startswith("bf16"):
            name = "bf16"
        r["name"] = name
        print(
            f"| {name} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f}% | "
            f"{r['bytes_4k']:.0f} | {100 * r['bytes_4k'] / bf16:.1f}% |"
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"kivi_equal_bytes_clip{clip:g}_windows{offset}-{offset + n_windows - 1}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {path}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=qb.DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--text-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality_lowrank_cpu"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clip",
        type=float,
        default=CLIP[2],
        help="range clip of every codec's 2-bit groups, a side (HACK's default; 0: min/max)",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a.model, a.windows, a.offset, a.context, a.stride, a.text_dir, a.out, a.clip)


if __name__ == "__main__":
    main()
