"""Measured low-rank plans (issue 19): what each per-layer choice of the `lowrank*` codecs costs in
perplexity, and the choice of all layers that costs least within a byte budget.

Two plans, both measured on calibration text (the training split; `zipserve bench quality`
scores the held-out split) with bench/quality_breakdown.py's forward (each layer's K and V
encoded page by page by the codec itself, every query reading the encoded pages before its own
page and its own page exactly, as the engine's compressed cache does):

- `lowrank`'s ranks (`rank_losses`, `allocate_ranks_measured`): for every layer, K or V alone at
  rank r in {step, 2 step, .., D} with everything else exact; then the ranks of all layers that
  minimize the summed NLL increase with sum(r_k) + sum(r_v) within the budget. The earlier
  allocation by retained energy (compress/calibrate.py: allocate_ranks) gave every layer's K the
  same weight per unit of energy; the measured losses differ by 100x between layers at the same
  energy (layer 5's K and V carry most of it on the reference model).
- `lowrank+hack2mix`'s widths and bits (`hack_option_losses`, `plan_hack`): for every layer, its
  K and V in HACK of `bits` on the first `width` coordinates of the calibrated bases (width a power
  of two >= 32, the HACK channel group, up to head_dim), everything else exact; then the plan of
  least summed loss within a byte budget. Written as lowrank_hack.json beside the bases.

Per-layer losses are summed as if independent (they are measured one layer at a time); the
summed prediction and the measured whole are reported in bench/QUALITY_BREAKDOWN.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PLAN_FILE = "lowrank_hack.json"
MIX_NAME = "lowrank+hack2mix"
PLAN_FORMAT = 1
HACK_BITS = (2, 4)
MIN_WIDTH = 32  # HACK's channel group


class LowRankPlanError(ValueError):
    """A missing or invalid lowrank_hack.json (names the file and the command that makes it)."""


@dataclass(frozen=True)
class HackPlan:
    """Per layer: HACK width (ranks of K and V both) and bits."""

    widths: list[int]
    bits: list[int]
    source: str = ""


# ---------------------------------------------------------------------------------------------
# Choosing one option per item within a budget


@dataclass(frozen=True)
class Option:
    cost: int
    """In budget units (ranks, or bytes per token)."""
    loss: float
    """Predicted NLL/token increase."""


def choose(options: Sequence[Sequence[Option]], budget: int) -> tuple[list[int], float]:
    """One option per item with total cost <= budget and the least summed loss (exact dynamic
    program over integer costs; ties go to the cheaper plan). Returns (index per item, loss).
    ValueError when even the cheapest options exceed the budget."""
    if sum(min(o.cost for o in opts) for opts in options) > budget:
        raise ValueError(f"budget: {budget} is below the cheapest plan")
    # best[c] = (loss, cost, picks) of the items so far at total cost c
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for opts in options:
        nxt: dict[int, tuple[float, list[int]]] = {}
        for c, (loss, picks) in best.items():
            for i, o in enumerate(opts):
                cc = c + o.cost
                if cc > budget:
                    continue
                cand = (loss + o.loss, picks + [i])
                if cc not in nxt or cand[0] < nxt[cc][0] - 1e-12:
                    nxt[cc] = cand
        best = nxt
    cost = min(best, key=lambda c: (round(best[c][0], 12), c))
    return best[cost][1], best[cost][0]


def monotone(losses: dict[int, float]) -> dict[int, float]:
    """Losses by rank made non-increasing in rank and >= 0: a larger rank is never predicted
    worse than a smaller one (measurement noise), nothing predicted better than exact."""
    out, floor = {}, 0.0
    for r in sorted(losses, reverse=True):
        floor = max(floor, losses[r])
        out[r] = floor
    return out


# ---------------------------------------------------------------------------------------------
# Measuring


def truncated(bases: list[dict[str, torch.Tensor]], rk: Sequence[int], rv: Sequence[int]):
    """Per-layer bases [KVH, D, D] (columns by falling energy) cut to ranks rk[l] / rv[l]."""
    return [
        {
            "k_enc": b["k_enc"][:, :, : rk[i]].contiguous(),
            "k_dec": b["k_dec"][:, :, : rk[i]].contiguous(),
            "v_enc": b["v_enc"][:, :, : rv[i]].contiguous(),
            "v_dec": b["v_dec"][:, :, : rv[i]].contiguous(),
        }
        for i, b in enumerate(bases)
    ]


def _losses(setup, wins, score, variants: Callable, codecs, progress) -> dict:
    """NLL/token increase over the exact model of each (key, variant) under each codec."""
    from zipserve.bench import quality_breakdown as qb

    total, n = qb.nll(setup, wins, qb.Variant("bf16", quantize=False), score)
    base = total / n
    out = {}
    for name, codec in codecs:
        setup.codecs[name], setup.codec_name = codec, name
        for key, v in variants(name):
            total, n = qb.nll(setup, wins, v, score)
            out[key] = total / n - base
            if progress:
                print(f"  {v.name}: {100 * math.expm1(out[key]):+.2f}% ppl", flush=True)
        del setup.codecs[name]
    return out


def rank_losses(
    setup, wins, score: int, bases, ranks: Sequence[int], progress: bool = False
) -> dict[tuple[int, str, int], float]:
    """(layer, "K"/"V", r) -> NLL/token increase with only that layer's K (or V) at rank r."""
    from zipserve.bench import quality_breakdown as qb
    from zipserve.compress.lowrank import LowRankCodec
    from zipserve.compress.lowrank_bases import LowRankBases

    cfg = setup.config
    nl, kvh, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim

    def codecs():
        for r in ranks:
            b = LowRankBases(truncated(bases, [r] * nl, [r] * nl), {})
            yield f"lowrank@{r}", LowRankCodec("lowrank", kvh, setup.page_size, d, b)

    def variants(name):
        r = int(name.split("@")[1])
        for layer in range(nl):
            for kind in "KV":
                v = qb.Variant(
                    f"layer {layer} {kind} rank {r}", layers=(layer,), k=kind == "K", v=kind == "V"
                )
                yield (layer, kind, r), v

    return _losses(setup, wins, score, variants, codecs(), progress)


def allocate_ranks_measured(
    losses: dict[tuple[int, str, int], float],
    num_layers: int,
    head_dim: int,
    budget: float,
    step: int,
) -> tuple[list[int], list[int], float]:
    """Ranks per layer (multiples of step, full rank head_dim costing no loss) minimizing the
    summed measured loss with sum(r_k) + sum(r_v) <= budget * 2 * head_dim * num_layers.
    Returns (r_k, r_v, predicted NLL/token increase)."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget: must be in (0, 1], got {budget}")
    ranks = list(range(step, head_dim + 1, step))
    if ranks[-1] != head_dim:
        raise ValueError(f"rank_step: {step} does not divide head_dim {head_dim}")
    items, choices = [], []
    for layer in range(num_layers):
        for kind in "KV":
            curve = monotone(
                {r: (0.0 if r == head_dim else losses[(layer, kind, r)]) for r in ranks}
            )
            items.append([Option(r // step, curve[r]) for r in ranks])
            choices.append(ranks)
    picks, loss = choose(items, int(budget * 2 * head_dim * num_layers) // step)
    chosen = [choices[i][p] for i, p in enumerate(picks)]
    return chosen[0::2], chosen[1::2], loss


def hack_widths(head_dim: int) -> list[int]:
    """HACK widths a lowrank layer may take: powers of two from 32 up to head_dim."""
    out, w = [], MIN_WIDTH
    while w <= head_dim:
        out.append(w)
        w *= 2
    return out


def hack_option_losses(
    setup, wins, score: int, bases, progress: bool = False
) -> dict[tuple[int, int, int], float]:
    """(layer, width, bits) -> NLL/token increase with only that layer's K and V in HACK of
    `bits` on the first `width` coordinates of the bases."""
    from zipserve.bench import quality_breakdown as qb
    from zipserve.compress.lowrank import LowRankCodec
    from zipserve.compress.lowrank_bases import LowRankBases

    cfg = setup.config
    nl, kvh, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim

    def codecs():
        for w in hack_widths(d):
            b = LowRankBases(truncated(bases, [w] * nl, [w] * nl), {})
            for bits in HACK_BITS:
                codec = LowRankCodec(MIX_NAME, kvh, setup.page_size, d, b, [bits] * nl, [w] * nl)
                yield f"lowrank@{w}/hack{bits}", codec

    def variants(name):
        w, bits = (int(x) for x in name.split("@")[1].split("/hack"))
        for layer in range(nl):
            yield (
                (layer, w, bits),
                qb.Variant(f"layer {layer} width {w} hack{bits}", layers=(layer,)),
            )

    return _losses(setup, wins, score, variants, codecs(), progress)


def hack_layer_bytes(num_kv_heads: int, page_size: int, width: int, bits: int) -> float:
    """Stored bytes per token of one layer's pages (all KV heads) in HACK at this width."""
    from zipserve.compress.hack import HackCodec

    return num_kv_heads * HackCodec(num_kv_heads, page_size, width, bits).page_bytes_per_token()


def plan_hack(
    losses: dict[tuple[int, int, int], float],
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    budget_bytes: float,
) -> tuple[HackPlan, float, float]:
    """The (width, bits) per layer of least summed loss with bytes per token <= budget_bytes.
    Returns (plan, bytes per token, predicted NLL/token increase)."""
    opts = [(w, b) for w in hack_widths(head_dim) for b in HACK_BITS]
    cost = {o: hack_layer_bytes(num_kv_heads, page_size, *o) for o in opts}
    unit = 0.25  # bytes per token are multiples of 1/page_size-ish; quarter bytes are exact here
    items = [
        [Option(math.ceil(cost[o] / unit - 1e-9), max(0.0, losses[(i, *o)])) for o in opts]
        for i in range(num_layers)
    ]
    picks, loss = choose(items, int(budget_bytes / unit + 1e-9))
    chosen = [opts[p] for p in picks]
    plan = HackPlan([w for w, _ in chosen], [b for _, b in chosen])
    return plan, sum(cost[o] for o in chosen), loss


# ---------------------------------------------------------------------------------------------
# The plan file


def _fix(model_dir) -> str:
    return f"create it with `zipserve calibrate --lowrank-hack --model {model_dir}`"


def load_hack_plan(
    model_dir: str | Path, num_layers: int | None = None, head_dim: int | None = None
) -> HackPlan:
    """lowrank+hack2mix's plan beside the bases. For a `random:NAME` model (random weights,
    nothing to measure) every layer at half head_dim (>= 32) in 2 bits and the last at full width
    in 4 bits: the bytes and the work of a typical plan, for speed benchmarks only."""
    if str(model_dir).startswith("random:"):
        from zipserve.engine.config import random_model_config

        cfg = random_model_config(str(model_dir))
        half = max(MIN_WIDTH, cfg.head_dim // 2)
        n = cfg.num_layers
        return HackPlan([half] * (n - 1) + [cfg.head_dim], [2] * (n - 1) + [4], "random")
    path = Path(model_dir) / PLAN_FILE
    if not path.is_file():
        raise LowRankPlanError(f"codec: {MIX_NAME} needs {path}; {_fix(model_dir)}")
    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowRankPlanError(
            f"codec: {path} is not valid JSON ({e}); {_fix(model_dir)}"
        ) from None
    widths = plan.get("widths") if isinstance(plan, dict) else None
    bits = plan.get("bits") if isinstance(plan, dict) else None
    ok = (
        isinstance(widths, list)
        and isinstance(bits, list)
        and len(widths) == len(bits) > 0
        and all(isinstance(b, int) and not isinstance(b, bool) and b in HACK_BITS for b in bits)
        and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= MIN_WIDTH and w & (w - 1) == 0
            for w in widths
        )
    )
    if ok and head_dim is not None:
        ok = all(w <= head_dim for w in widths)
    if ok and num_layers is not None:
        ok = len(widths) == num_layers
    if not ok:
        raise LowRankPlanError(
            f'codec: {path} has no valid "widths" and "bits" (per layer: a power of two '
            f">= {MIN_WIDTH} up to head_dim, and one of {HACK_BITS}"
            + (f", {num_layers} layers" if num_layers is not None else "")
            + f"; got {widths!r}, {bits!r}); {_fix(model_dir)}"
        )
    return HackPlan(list(widths), list(bits), str(path))


# ---------------------------------------------------------------------------------------------
# `zipserve calibrate --lowrank-hack`


def calibrate_hack_plan(
    model: str,
    measure: list[list[int]],
    budget: float,
    out_dir: str | Path,
    page_size: int = 64,
    progress: bool = True,
) -> dict:
    """Measure every (layer, width, bits) on the `measure` windows (training split, last half of
    each scored) with the bases beside `model` (full rank: `zipserve calibrate` writes them so)
    and write the plan of least predicted loss within budget * bf16's bytes per token as
    lowrank_hack.json in out_dir. Returns what it wrote."""
    import time

    from zipserve.bench import quality_breakdown as qb
    from zipserve.compress.lowrank_bases import LowRankBases

    t0 = time.perf_counter()
    config, net, _ = qb.load(model)
    nl, kvh, d = config.num_layers, config.num_kv_heads, config.head_dim
    full = LowRankBases.load(model, ranks=([d] * nl, [d] * nl))
    setup = qb.Setup(net, config, MIX_NAME, page_size, model_dir=model)
    score = min(len(w) for w in measure) // 2
    losses = hack_option_losses(setup, measure, score, full.layers, progress)
    bf16 = nl * kvh * 2 * d * 2
    plan, nbytes, predicted = plan_hack(losses, nl, kvh, d, page_size, budget * bf16)
    info = {
        "format": PLAN_FORMAT,
        "codec": MIX_NAME,
        "widths": plan.widths,
        "bits": plan.bits,
        "bytes_per_token": nbytes,
        "bf16_bytes_per_token": bf16,
        "ratio_vs_bf16": nbytes / bf16,
        "budget": budget,
        "calibration": {
            "text": "training split (train/corpus.py), shuffled with seed 0, its last 200 files",
            "windows": len(measure),
            "context": min(len(w) for w in measure),
            "scored_per_window": score,
            "page_size": page_size,
        },
        "sensitivity": [
            {"layer": layer, "width": w, "bits": b, "nll_increase": round(x, 6)}
            for (layer, w, b), x in sorted(losses.items())
        ],
        "predicted_nll_increase": predicted,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(out_dir) / PLAN_FILE
    out.write_text(json.dumps(info, indent=1) + "\n")
    return info
