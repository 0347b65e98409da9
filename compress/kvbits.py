"""`hack2mix`: HACK with per-layer bits from a measured plan (issue 19).

HACK at 2 bits loses almost all of its perplexity in a few layers (bench/QUALITY_BREAKDOWN.md: on
the reference model layer 5's keys carry 69-85% of hack2's +9.8%). `hack2mix` keeps those layers
in hack4 and every other layer in hack2. Which layers is measured, not hand-picked:
`zipserve calibrate --kvbits` (`calibrate_kvbits`) quantizes one layer at a time on calibration
text (the training split; `bench quality` scores the held-out split), ranks the layers by the loss
that hack4 wins back over hack2, and upgrades them greedily while the bytes stay within a budget
(default 25% of bf16's bytes per token) and the predicted gain is worth it. The plan is written
beside the checkpoint as kvbits.json, with what was measured.

Each layer's codec is a plain HackCodec of that layer's bits (`for_layer`, as LowRankCodec does),
so the kernels, stores, prefill/decode attention, dense decode and the wire run per layer
unchanged. On the wire a layer's pages carry its own codec's name (`hack2` / `hack4`), checked
against the receiving layer's codec (compress/wire/pages.py: check_layout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from zipserve.compress.codec import CHANNEL_GROUP, KVCodec
from zipserve.compress.hack import HackCodec

KVBITS_FILE = "kvbits.json"
NAME = "hack2mix"
BASE_BITS, UPGRADE_BITS = 2, 4
FORMAT = 1


class KVBitsError(ValueError):
    """A missing or invalid kvbits.json (names the file and the command that makes it)."""


def _fix(model_dir) -> str:
    return f"create it with `zipserve calibrate --kvbits --model {model_dir}`"


def load_bits(model_dir: str | Path) -> list[int]:
    """Per-layer bits of the plan beside a checkpoint. For a `random:NAME` model (random weights,
    nothing to measure) its last layer in 4 bits: the bytes and the work of a typical plan, for
    speed benchmarks only."""
    if str(model_dir).startswith("random:"):
        from zipserve.engine.config import random_model_config

        n = random_model_config(str(model_dir)).num_layers
        return [BASE_BITS] * (n - 1) + [UPGRADE_BITS]
    path = Path(model_dir) / KVBITS_FILE
    if not path.is_file():
        raise KVBitsError(f"codec: {NAME} needs {path}; {_fix(model_dir)}")
    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KVBitsError(f"codec: {path} is not valid JSON ({e}); {_fix(model_dir)}") from None
    bits = plan.get("bits") if isinstance(plan, dict) else None
    if (
        not isinstance(bits, list)
        or not bits
        or any(isinstance(b, bool) or b not in (BASE_BITS, UPGRADE_BITS) for b in bits)
    ):
        raise KVBitsError(
            f'codec: {path} has no valid "bits" (a list with {BASE_BITS} or '
            f"{UPGRADE_BITS} per layer, got {bits!r}); {_fix(model_dir)}"
        )
    return list(bits)


class HackMixedCodec(KVCodec):
    """HACK with per-layer bits: one HackCodec per layer (hack4 where the plan says 4 bits)."""

    n_sink = HackCodec.n_sink
    head_dim_multiple = CHANNEL_GROUP

    def __init__(
        self,
        num_kv_heads,
        page_size,
        head_dim,
        bits: list[int],
        source: str = "",
        clip: dict[int, float] | None = None,
    ):
        """clip: the HACK encoder's range clip per bit width (HackCodec's clip; a width left out
        or None: the encoder's default)."""
        self.name = NAME
        super().__init__(num_kv_heads, page_size, head_dim)
        self.bits, self.source = list(bits), source
        clip = clip or {}
        by_bits = {
            b: HackCodec(num_kv_heads, page_size, head_dim, b, clip=clip.get(b))
            for b in set(self.bits)
        }
        self.layers = [by_bits[b] for b in self.bits]  # layers of equal bits share one codec

    @classmethod
    def load(
        cls, num_kv_heads, page_size, head_dim, model_dir, clip: dict[int, float] | None = None
    ) -> HackMixedCodec:
        if model_dir is None:
            raise KVBitsError(f"codec: {NAME} needs a model directory with {KVBITS_FILE}")
        return cls(
            num_kv_heads,
            page_size,
            head_dim,
            load_bits(model_dir),
            str(Path(str(model_dir)) / KVBITS_FILE),
            clip,
        )

    def for_layer(self, layer: int) -> KVCodec:
        if not 0 <= layer < len(self.layers):
            raise KVBitsError(
                f"codec: {self.source or KVBITS_FILE} plans {len(self.layers)} "
                f"layers, the model has more (layer {layer}); calibrate it again"
            )
        return self.layers[layer]

    def _per_layer(self, *_):
        raise TypeError("HackMixedCodec has one codec per layer: use for_layer(layer)")

    new_store = encode = seal = dequantize = dequantize_into = _per_layer
    decode_attention = prefill_attention = _per_layer

    def num_splits(self, batch, max_len, num_sms):
        return self.layers[0].num_splits(batch, max_len, num_sms)

    def page_bytes_per_token(self):
        """Averaged over layers (bytes_per_token sums the layers exactly)."""
        return sum(c.page_bytes_per_token() for c in self.layers) / len(self.layers)


# ---------------------------------------------------------------------------------------------
# Calibration: which layers get 4 bits


def plan_bits(
    gains: list[float],
    layer_bytes: dict[int, float],
    num_layers: int,
    budget_bytes: float,
    min_gain: float,
) -> tuple[list[int], list[str]]:
    """Greedy plan: layers by falling predicted gain (NLL/token won back by 4 bits), upgraded
    while the bytes per token (layer_bytes[bits] per layer, summed) stay <= budget_bytes and the
    gain is >= min_gain. Returns (bits per layer, why each candidate was taken or not)."""
    bits = [BASE_BITS] * num_layers
    total = num_layers * layer_bytes[BASE_BITS]
    if total > budget_bytes:
        raise ValueError(
            f"budget: {BASE_BITS}-bit HACK alone needs {total:.0f} B/token, over the "
            f"budget of {budget_bytes:.0f}"
        )
    notes = []
    step = layer_bytes[UPGRADE_BITS] - layer_bytes[BASE_BITS]
    for layer in sorted(range(num_layers), key=lambda i: -gains[i]):
        if gains[layer] < min_gain:
            notes.append(f"layer {layer}: gain {gains[layer]:.5f} < {min_gain}: stop")
            break
        if total + step > budget_bytes + 1e-9:
            notes.append(
                f"layer {layer}: {total + step:.0f} B/token would exceed the budget "
                f"{budget_bytes:.0f}: stop"
            )
            break
        bits[layer], total = UPGRADE_BITS, total + step
        notes.append(f"layer {layer}: gain {gains[layer]:.5f}, {total:.0f} B/token: 4 bits")
    return bits, notes


def calibrate_kvbits(
    model: str,
    out_dir: str | Path | None = None,
    text_dir: str | None = None,
    n_windows: int = 4,
    context: int = 1024,
    score: int = 512,
    budget: float = 0.25,
    min_gain: float = 0.005,
    page_size: int = 64,
    progress: bool = True,
) -> dict:
    """Measure each layer's sensitivity on the training split and write kvbits.json.

    Per layer l, on n_windows windows of `context` tokens of the training split (the last
    `score` tokens scored): the NLL/token increase over the exact model with only layer l in
    hack2, and with only layer l in hack4 (bench/quality_breakdown.py's forward: the codec's own
    encode + dequantize, each query reading the encoded pages before its own). The predicted gain
    of 4 bits in layer l is the difference; `plan_bits` picks the layers. budget: bytes per token
    as a fraction of bf16's; min_gain: the least gain worth a layer, as a relative perplexity
    decrease (0.005 = 0.5%)."""
    import random
    import time

    from zipserve.bench import quality_breakdown as qb
    from zipserve.train.corpus import load_corpus

    t0 = time.perf_counter()
    config, net, tok = qb.load(model)
    corpus = load_corpus(text_dir)
    docs = list(corpus.train)
    random.Random(0).shuffle(docs)  # a fixed sample across the whole training split
    wins = qb.windows(tok, docs[:64], n_windows, context)
    setup = qb.Setup(net, config, "hack2", page_size)
    nl = config.num_layers

    def nll(v) -> float:
        total, n = qb.nll(setup, wins, v, score)
        return total / n

    base = nll(qb.Variant("bf16", quantize=False))
    rows = []
    for layer in range(nl):
        d = {}
        for bits in (BASE_BITS, UPGRADE_BITS):
            setup.codec_name = f"hack{bits}"
            d[bits] = nll(qb.Variant(f"layer {layer} hack{bits}", layers=(layer,))) - base
        rows.append(
            {
                "layer": layer,
                "nll_increase_hack2": d[BASE_BITS],
                "nll_increase_hack4": d[UPGRADE_BITS],
                "gain": d[BASE_BITS] - d[UPGRADE_BITS],
            }
        )
        if progress:
            print(
                f"  layer {layer}: hack2 {100 * math.expm1(d[BASE_BITS]):+.2f}%  hack4 "
                f"{100 * math.expm1(d[UPGRADE_BITS]):+.2f}%  ppl",
                flush=True,
            )
    kvh, hd = config.num_kv_heads, config.head_dim
    layer_bytes = {
        b: kvh * HackCodec(kvh, page_size, hd, b).page_bytes_per_token()
        for b in (BASE_BITS, UPGRADE_BITS)
    }
    bf16 = nl * kvh * 2 * hd * 2
    bits, notes = plan_bits(
        [r["gain"] for r in rows], layer_bytes, nl, budget * bf16, math.log1p(min_gain)
    )
    planned = sum(layer_bytes[b] for b in bits)
    info = {
        "format": FORMAT,
        "codec": NAME,
        "bits": bits,
        "layers_4bit": [i for i, b in enumerate(bits) if b == UPGRADE_BITS],
        "bytes_per_token": planned,
        "bf16_bytes_per_token": bf16,
        "ratio_vs_bf16": planned / bf16,
        "budget": budget,
        "min_gain": min_gain,
        "calibration": {
            "text": "training split (train/corpus.py), shuffled with seed 0",
            "windows": n_windows,
            "context": context,
            "scored_per_window": score,
            "tokens_scored": n_windows * score,
            "page_size": page_size,
            "nll_per_token_bf16": base,
        },
        "sensitivity": rows,
        "predicted_nll_increase": sum(
            r["nll_increase_hack4" if b == UPGRADE_BITS else "nll_increase_hack2"]
            for r, b in zip(rows, bits)
        ),
        "decisions": notes,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(out_dir or model) / KVBITS_FILE
    out.write_text(json.dumps(info, indent=1) + "\n")
    return info
