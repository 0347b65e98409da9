"""What a quality-breakdown variant costs in bytes, and the variant sets the tool runs
(bench/quality_breakdown.py): the per-layer / per-kind / per-head / per-position breakdown and the
experiments (recent windows, outlier channels, per-layer bits).

bytes/token: stored KV bytes per token over all layers: the full pages of the variant's codecs
(bf16 where a layer/kind is left exact), plus what the variant keeps in 16-bit beyond the codec (a
recent window W of tokens not yet encoded, amortized over sequences of `seq_len` tokens; outlier
channels). The open page and sinks, common to all variants, are left out. Diagnostic variants have
no byte cost (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from zipserve.compress.codec import KVCodec
from zipserve.compress.hack import HackCodec
from zipserve.compress.lowrank import LowRankLayerCodec

if TYPE_CHECKING:
    from zipserve.bench.quality_breakdown import Setup


@dataclass(frozen=True)
class Variant:
    """Which part of the KV is quantized; everything else stays exact (fp32 here)."""

    name: str
    group: str = ""
    layers: tuple[int, ...] | None = None  # None: all
    heads: tuple[int, ...] | None = None  # KV heads; None: all
    k: bool = True
    v: bool = True
    positions: str = "all"  # all | recent | far | sinks
    window: int = 0  # W of the recent / far classes: recent = key within W tokens before query
    quant_sinks: bool = False  # also quantize the codec's sink tokens (HACK keeps 4 in 16-bit)
    outlier_k: int = 0  # top channels per (layer, KV head) of K kept exact
    outlier_v: int = 0
    overrides: tuple[tuple[int, str, str, int | None], ...] = ()
    """(layer, codec, kinds "K"/"V"/"KV", KV head or None for all): another codec for that part
    ("bf16" keeps it exact), e.g. hack4 for the most sensitive layer's K."""
    cost: bool = True  # has a byte cost (False for diagnostic subsets)
    quantize: bool = True  # False: nothing quantized (the bf16 reference)


def kind_bytes(codec: KVCodec, head_dim: int) -> tuple[float, float]:
    """(K, V) stored bytes per token and KV head of a full page."""
    if isinstance(codec, LowRankLayerCodec):  # float16 columns of each rank, or HACK codes
        if codec.inner is None:
            return 2.0 * codec.rk, 2.0 * codec.rv
        return kind_bytes(codec.inner, codec.width)
    if isinstance(codec, HackCodec):
        d, b, p, gv = head_dim, codec.bits, codec.page_size, codec.group_v
        kb = d * b / 8 + 2 * d * 2 / p + 4  # codes, K scale+min per channel, k_sums
        vb = d * b / 8 + 2 * (d // gv) * 2 + 4 * d / p  # codes, V scale+min per group, v_sums
        assert abs(kb + vb - codec.page_bytes_per_token()) < 1e-9
        return kb, vb
    half = codec.page_bytes_per_token() / 2
    return half, half


def variant_bytes(setup: Setup, v: Variant, seq_len: int) -> float | None:
    """KV bytes per token over all layers (full pages + the variant's 16-bit extras amortized at
    seq_len); None for diagnostic variants."""
    if not v.cost:
        return None
    cfg = setup.config
    d, kvh = cfg.head_dim, cfg.num_kv_heads
    total = 0.0
    for li in range(cfg.num_layers):
        on = v.quantize and (v.layers is None or li in v.layers)
        for h in range(kvh):
            hon = on and (v.heads is None or h in v.heads)
            cb = kind_bytes(setup.codec(li, v), d) if hon else (2.0 * d, 2.0 * d)
            kb = cb[0] if (hon and v.k) else 2.0 * d
            vb = cb[1] if (hon and v.v) else 2.0 * d
            for ol, name, kinds, head in v.overrides:
                if hon and ol == li and head in (None, h):
                    ob = kind_bytes(setup.codec(li, v, name), d)
                    kb = ob[0] if "K" in kinds and v.k else kb
                    vb = ob[1] if "V" in kinds and v.v else vb
            if hon and v.positions == "far" and v.window:  # W newest tokens not yet encoded
                total += min(v.window, seq_len) / seq_len * (4.0 * d - kb - vb)
            if hon and v.k and v.outlier_k:
                kb += 2 * v.outlier_k
            if hon and v.v and v.outlier_v:
                vb += 2 * v.outlier_v
            total += kb + vb
    return total


def breakdown_variants(num_layers: int, kvh: int, window: int) -> list[Variant]:
    vs = [Variant("bf16 (nothing quantized)", "ref", quantize=False), Variant("all (codec)", "ref")]
    vs += [Variant(f"layer {li}", "layer", layers=(li,)) for li in range(num_layers)]
    vs += [Variant("K only", "kind", v=False), Variant("V only", "kind", k=False)]
    vs += [
        Variant(f"layer {li} {kind}", "layer x kind", layers=(li,), k=kind == "K", v=kind == "V")
        for li in range(num_layers)
        for kind in "KV"
    ]
    vs += [Variant(f"KV head {h}", "head", heads=(h,)) for h in range(kvh)]
    vs += [
        Variant("sinks quantized too", "position", quant_sinks=True),
        Variant(
            "only sinks quantized", "position", quant_sinks=True, positions="sinks", cost=False
        ),
        Variant(
            f"only recent (W={window})", "position", positions="recent", window=window, cost=False
        ),
        Variant(f"only far (> W={window})", "position", positions="far", window=window),
    ]
    return vs


def experiment_variants(
    num_layers: int, windows_w=(64, 128, 256), outliers=(2, 4, 8)
) -> list[Variant]:
    vs = [
        Variant(f"recent W={w} exact", "exp: recent window", positions="far", window=w)
        for w in windows_w
    ]
    vs += [
        Variant(f"top-{n} K channels exact", "exp: outlier channels", outlier_k=n) for n in outliers
    ]
    vs += [
        Variant(f"top-{n} V channels exact", "exp: outlier channels", outlier_v=n)
        for n in outliers[1:2]
    ]
    vs += [
        Variant(f"top-{n} K+V channels exact", "exp: outlier channels", outlier_k=n, outlier_v=n)
        for n in outliers[1:2]
    ]
    if num_layers == 6:  # the reference model: its most sensitive parts (the breakdown above)
        vs += [
            Variant("L5 K hack4", "exp: per-layer bits", overrides=((5, "hack4", "K", None),)),
            Variant(
                "L5 KV-head 1 K hack4", "exp: per-layer bits", overrides=((5, "hack4", "K", 1),)
            ),
            Variant("L5 K+V hack4", "exp: per-layer bits", overrides=((5, "hack4", "KV", None),)),
            Variant(
                "L2,4,5 K hack4",
                "exp: per-layer bits",
                overrides=tuple((li, "hack4", "K", None) for li in (2, 4, 5)),
            ),
            Variant("L5 K bf16", "exp: per-layer bits", overrides=((5, "bf16", "K", None),)),
            Variant(
                "L5 K hack4 + recent W=64 exact",
                "exp: combined",
                positions="far",
                window=64,
                overrides=((5, "hack4", "K", None),),
            ),
            Variant(
                "L2,4,5 K hack4 + recent W=64 exact",
                "exp: combined",
                positions="far",
                window=64,
                overrides=tuple((li, "hack4", "K", None) for li in (2, 4, 5)),
            ),
        ]
    return vs
