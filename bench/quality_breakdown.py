"""Where a KV codec's perplexity loss comes from (issue 19): quantize only a subset of the KV.

`python3 -m zipserve.bench.quality_breakdown [--codec hack2 --windows 4 --context 1024]`

Runs the reference model's forward in torch with "fake quant" K/V: each layer's K (after RoPE, as
the cache stores it) and V are encoded page by page with the codec's own `encode` and read back
with its `dequantize` (compress/codecs.py: the HACK torch reference encoder with its Hadamard
rotation, KIVI's quantize.py, ...), and every query attends to the dequantized K/V of the full
pages before its own page and exactly to its own page and the codec's sinks: the decode-time
view that `zipserve bench quality` scores (`--check-engine` compares the logits with the
engine's compressed cache). A `Variant` then keeps part of that quantized set exact:

  * per layer / per KV head (quantize only layer l, head h),
  * K only vs V only,
  * per position class of the key relative to the query: sinks (first n_sink tokens of the
    window, which HACK keeps 16-bit anyway), recent (the W tokens before the query), far past,
  * per channel: the top-k channels per (layer, KV head) by RMS on calibration text (a training
    split file; K's RoPE pairs (c, c + D/2) ranked together) zeroed before encoding and kept
    exact, so they neither cost error nor widen the rotated ranges of the other channels,
  * per layer codec (e.g. hack4 on the most sensitive layers).

Perplexity is over `--windows` windows of `--context` tokens cut from the held-out split
(train/corpus.py, as `zipserve bench quality` takes it), scoring the last `--stride` tokens of
each window (so every scored token has context - stride .. context - 1 tokens of history, as in
the sliding-window evaluation). Every variant sees the same tokens: differences are paired.

bytes/token: stored KV bytes per token over all layers: the full pages of the variant's codecs
(bf16 where a layer/kind is left exact), plus what the variant keeps in 16-bit beyond the codec
(a recent window W of tokens not yet encoded, amortized over sequences of 1k and 4k tokens;
outlier channels). The open page and sinks, common to all variants, are left out, as in the
"pages" column of bench/RESULTS.md. Diagnostic variants (e.g. "only the recent window
quantized") have no byte cost and leave it empty.

Prints a markdown table and writes quality_breakdown.csv under --out.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zipserve.bench.quality_variants import (
    Variant,
    breakdown_variants,
    experiment_variants,
    variant_bytes,
)
from zipserve.compress.codec import KVCodec
from zipserve.compress.codecs import make_codec

DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "zipserve-ref")


@dataclass
class Setup:
    net: torch.nn.Module
    config: object
    codec_name: str
    page_size: int = 64
    outliers: dict = field(default_factory=dict)  # (layer, kind) -> LongTensor [KVH, D] order
    codecs: dict = field(default_factory=dict)
    """name -> codec; a caller may add its own (e.g. lowrank bases of another rank)."""
    model_dir: str = DEFAULT_MODEL
    """Where calibrated codecs (hack2mix, lowrank*) read their files."""

    def codec(self, layer: int, v: Variant, name: str | None = None) -> KVCodec:
        """The variant's codec (or `name`) for a layer; bf16 is the dense codec in fp32 (its
        round trip is exact, its bytes counted at 16 bits)."""
        name = name or self.codec_name
        if name not in self.codecs:
            c = self.config
            self.codecs[name] = make_codec(
                name,
                c.num_kv_heads,
                self.page_size,
                c.head_dim,
                model_dir=self.model_dir,
                dtype=torch.float32,
            )
        return self.codecs[name].for_layer(layer)


# ---------------------------------------------------------------------------------------------
# Model forward with a decode-time view of fake-quantized KV


def _roundtrip(codec: KVCodec, k: torch.Tensor, v: torch.Tensor, p: int):
    """k, v [T, KVH, D] -> codec encode + dequantize of the full pages, in the model's basis (a
    lowrank codec's values lifted back from V's completed basis, `lift_v`); the partial last page
    is returned unchanged (it is never attended as encoded)."""
    t, h, d = k.shape
    n = t // p
    kh, vh = k.float().clone(), v.float().clone()
    if n == 0:
        return kh, vh
    pages = lambda x: x[: n * p].reshape(n, p, h, d).transpose(1, 2).contiguous()  # noqa: E731
    store = codec.new_store(n, k.device)
    ids = torch.arange(n, device=k.device)
    codec.encode(store, ids, pages(k), pages(v))
    dk, dv = codec.dequantize(store, ids)  # [n, KVH, P, D]
    if hasattr(codec, "lift_v"):  # lowrank: the tail is exact, pages stand for their lift
        dv = codec.lift_v(dv)
    kh[: n * p] = dk.transpose(1, 2).reshape(n * p, h, d)
    vh[: n * p] = dv.transpose(1, 2).reshape(n * p, h, d)
    return kh, vh


def _without(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """x [T, KVH, D] with channels idx [KVH, k] zeroed (they are kept exact beside the codes)."""
    if idx is None:
        return x
    return x.scatter(2, idx[None].expand(x.shape[0], -1, -1), 0.0)


def _restore(xh: torch.Tensor, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        return xh
    i = idx[None].expand(x.shape[0], -1, -1)
    return xh.scatter(2, i, x.float().gather(2, i))


def _quant_mask(t: int, p: int, n_sink: int, v: Variant, device) -> torch.Tensor:
    """[T, T] bool: key s is read quantized by query t."""
    q = torch.arange(t, device=device)[:, None]
    s = torch.arange(t, device=device)[None, :]
    m = (s // p) < (q // p)  # full pages before the query's own page
    sink = s < n_sink
    if not v.quant_sinks:
        m &= ~sink
    if v.positions == "recent":
        m &= (q - s) <= v.window
    elif v.positions == "far":
        m &= (q - s) > v.window
    elif v.positions == "sinks":
        m &= sink
    elif v.positions != "all":
        raise ValueError(f"positions: all, recent, far or sinks, got {v.positions!r}")
    return m


def _attention(q, k, v, kh, vh, mk, mv, scale):
    """q [T, H, D]; exact k/v and dequantized kh/vh [T, KVH, D]; masks [KVH, T, T] of keys read
    quantized (K and V separately). Causal; returns [T, H, D] fp32."""
    t, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    qf = q.float().view(t, kvh, g, d).permute(1, 2, 0, 3)  # [KVH, g, T, D]
    ke, kq = k.float().transpose(0, 1), kh.transpose(0, 1)  # [KVH, T, D]
    ve, vq = v.float().transpose(0, 1), vh.transpose(0, 1)
    se = qf @ ke[:, None].transpose(-1, -2)  # [KVH, g, T, T]
    sq = qf @ kq[:, None].transpose(-1, -2)
    s = torch.where(mk[:, None], sq, se) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    pr = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    mvf = mv[:, None].float()
    o = (pr * mvf) @ vq[:, None] + (pr * (1 - mvf)) @ ve[:, None]  # [KVH, g, T, D]
    return o.permute(2, 0, 1, 3).reshape(t, h, d)


@torch.inference_mode()
def forward(setup: Setup, ids: list[int], v: Variant, stats: dict | None = None) -> torch.Tensor:
    """Logits [T, vocab] of one window under variant v (fp32)."""
    net, cfg, p = setup.net, setup.config, setup.page_size
    dev = net.embed_tokens.weight.device
    x_ids = torch.tensor(ids, device=dev)
    t = len(ids)
    pos = torch.arange(t, device=dev)
    x = net.embed_tokens(x_ids)
    kvh = cfg.num_kv_heads
    for li, layer in enumerate(net.layers):
        att = layer.self_attn
        hx = layer.input_layernorm(x)
        q, k, vv = att.qkv_proj(hx).split([att.q_size, att.kv_size, att.kv_size], dim=-1)
        q = q.view(t, att.num_heads, att.head_dim)
        k = k.view(t, kvh, att.head_dim)
        vv = vv.view(t, kvh, att.head_dim)
        q, k = net.rope(pos, q, k)
        on = v.quantize and (v.layers is None or li in v.layers)
        if on:
            codec = setup.codec(li, v)
            ok = setup.outliers[(li, "k")][:, : v.outlier_k] if v.outlier_k else None
            ov = setup.outliers[(li, "v")][:, : v.outlier_v] if v.outlier_v else None
            kh, vh = _roundtrip(codec, _without(k, ok), _without(vv, ov), p)
            kh, vh = _restore(kh, k, ok), _restore(vh, vv, ov)
            for ol, name, kinds, head in v.overrides:
                if ol != li:
                    continue
                oc = setup.codec(li, v, name)
                ok2, ov2 = _roundtrip(oc, k, vv, p)
                hs = slice(None) if head is None else slice(head, head + 1)
                if "K" in kinds:
                    kh[:, hs] = ok2[:, hs]
                if "V" in kinds:
                    vh[:, hs] = ov2[:, hs]
            base = _quant_mask(t, p, codec.n_sink, v, dev)
            heads = torch.zeros(kvh, dtype=torch.bool, device=dev)
            heads[list(v.heads) if v.heads is not None else slice(None)] = True
            mk = base[None] & heads[:, None, None] & v.k
            mv = base[None] & heads[:, None, None] & v.v
            if stats is not None:
                _collect(stats, li, q, k, kh, vv, vh, base)
        else:
            kh, vh = k.float(), vv.float()
            mk = mv = torch.zeros(kvh, t, t, dtype=torch.bool, device=dev)
        o = _attention(q, k, vv, kh, vh, mk, mv, att.scale).to(x.dtype)
        x = x + att.o_proj(o.reshape(t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return net.lm_head(net.norm(x)).float()


def _collect(stats, li, q, k, kh, v, vh, base):
    """Per-channel error energy of the quantized keys/values (model basis): K's logit-error
    share E[q_c^2] E[(k_c - k^_c)^2] and V's E[(v_c - v^_c)^2], summed over windows."""
    quant_keys = base.any(0)  # keys some query reads quantized
    ek = (kh - k.float())[quant_keys]  # [N, KVH, D]
    ev = (vh - v.float())[quant_keys]
    kvh = k.shape[1]
    q2 = q.float().pow(2).view(q.shape[0], kvh, -1, q.shape[2]).mean((0, 2))  # [KVH, D]
    s = stats.setdefault(li, dict(q2=0, ek2=0, ev2=0, k2=0, v2=0, n=0))
    s["q2"] = s["q2"] + q2
    s["ek2"] = s["ek2"] + ek.pow(2).sum(0)
    s["ev2"] = s["ev2"] + ev.pow(2).sum(0)
    s["k2"] = s["k2"] + k.float()[quant_keys].pow(2).sum(0)
    s["v2"] = s["v2"] + v.float()[quant_keys].pow(2).sum(0)
    s["n"] += ek.shape[0]


# ---------------------------------------------------------------------------------------------
# Data, calibration, perplexity


def load(model: str = DEFAULT_MODEL):
    from zipserve.engine.loading import build_model
    from zipserve.engine.tokenizer import load_tokenizer

    config, net, _ = build_model(model, "float32", torch.device("cpu"), max_positions=4096)
    return config, net, load_tokenizer(model)


def windows(tok, docs, n: int, context: int, offset: int = 0) -> list[list[int]]:
    """n windows of `context` tokens: consecutive non-overlapping chunks of the docs, taken round
    robin over the docs (first chunk of each doc, then second, ...), skipping the first
    `offset` (fresh windows to validate choices made on the first ones)."""
    chunks = []
    for d in docs:
        ids = tok.encode(d.text)
        chunks.append([ids[i : i + context] for i in range(0, len(ids) - context + 1, context)])
    out, r = [], 0
    while len(out) < n + offset and any(r < len(c) for c in chunks):
        out += [c[r] for c in chunks if r < len(c)]
        r += 1
    if len(out) < n + offset:
        raise ValueError(
            f"windows: the docs hold {len(out)} windows of {context} tokens, "
            f"asked for {n} after {offset}"
        )
    return out[offset : offset + n]


def calibrate_outliers(setup: Setup, calib: list[list[int]], max_k: int = 16) -> None:
    """Rank each (layer, KV head)'s channels by RMS on calib windows (exact forward): K by RoPE
    pair (c, c + D/2), both channels of a pair in a row; V by channel. Fills setup.outliers."""
    net, cfg = setup.net, setup.config
    d, kvh = cfg.head_dim, cfg.num_kv_heads
    acc: dict = {}
    with torch.inference_mode():
        for ids in calib:
            t = len(ids)
            pos = torch.arange(t)
            x = net.embed_tokens(torch.tensor(ids))
            for li, layer in enumerate(net.layers):
                att = layer.self_attn
                hx = layer.input_layernorm(x)
                q, k, vv = att.qkv_proj(hx).split([att.q_size, att.kv_size, att.kv_size], -1)
                q, k = net.rope(pos, q.view(t, -1, d), k.view(t, kvh, d))
                vv = vv.view(t, kvh, d)
                a = acc.setdefault(li, [0, 0])
                a[0] = a[0] + k.float().pow(2).sum(0)
                a[1] = a[1] + vv.float().pow(2).sum(0)
                o = _attention(
                    q,
                    k,
                    vv,
                    k.float(),
                    vv.float(),
                    *(torch.zeros(kvh, t, t, dtype=torch.bool),) * 2,
                    att.scale,
                )
                x = x + att.o_proj(o.reshape(t, -1))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
    half = d // 2
    for li, (k2, v2) in acc.items():
        pair = k2[:, :half] + k2[:, half:]  # [KVH, D/2]
        order = pair.argsort(1, descending=True)
        setup.outliers[(li, "k")] = torch.stack([order, order + half], 2).reshape(kvh, d)
        setup.outliers[(li, "v")] = v2.argsort(1, descending=True)
        setup.outliers[(li, "k_rms")] = (k2 / sum(len(c) for c in calib)).sqrt()
        setup.outliers[(li, "v_rms")] = (v2 / sum(len(c) for c in calib)).sqrt()


def nll(
    setup: Setup, wins: list[list[int]], v: Variant, score: int, stats: dict | None = None
) -> tuple[float, int]:
    total, count = 0.0, 0
    for ids in wins:
        logp = torch.log_softmax(forward(setup, ids, v, stats), -1)
        t = len(ids)
        rows = torch.arange(t - score - 1, t - 1)
        total -= logp[rows, torch.tensor(ids[t - score :])].sum().item()
        count += score
    return total, count


# ---------------------------------------------------------------------------------------------


def run(
    codec: str = "hack2",
    model: str = DEFAULT_MODEL,
    n_windows: int = 4,
    context: int = 1024,
    stride: int = 512,
    text_dir: str | None = None,
    out: Path | None = None,
    sets: tuple[str, ...] = ("breakdown", "experiments"),
    window: int = 128,
    extra: list[Variant] | None = None,
    progress: bool = True,
    offset: int = 0,
    codecs=None,
):
    """codecs: optional callable (config, page_size) -> {name: codec} used instead of the
    registry's codecs of those names (e.g. codecs built with other encoder settings)."""
    from zipserve.train.corpus import load_corpus

    torch.manual_seed(0)
    config, net, tok = load(model)
    setup = Setup(net, config, codec, model_dir=model)
    if codecs is not None:
        setup.codecs.update(codecs(config, setup.page_size))
    corpus = load_corpus(text_dir)
    wins = windows(tok, corpus.held_out, n_windows, context, offset)
    calib = windows(tok, corpus.train[:40], 4, context)
    calibrate_outliers(setup, calib)
    variants: list[Variant] = []
    if "breakdown" in sets:
        variants += breakdown_variants(config.num_layers, config.num_kv_heads, window)
    if "experiments" in sets:
        variants += experiment_variants(config.num_layers)
    variants += extra or []
    if not variants or variants[0].quantize:
        variants = [
            Variant("bf16 (nothing quantized)", "ref", quantize=False),
            Variant("all (codec)", "ref"),
        ] + [v for v in variants if v.group != "ref"]
    rows, stats = [], {}
    bf16_bytes = 2 * 2 * config.head_dim * config.num_kv_heads * config.num_layers
    for v in variants:
        t0 = time.perf_counter()
        s = stats if v.name == "all (codec)" else None
        total, n = nll(setup, wins, v, stride, s)
        rows.append(
            dict(
                group=v.group,
                variant=v.name,
                codec=codec,
                nll_per_token=total / n,
                perplexity=math.exp(total / n),
                tokens=n,
                bytes_1k=variant_bytes(setup, v, 1024),
                bytes_4k=variant_bytes(setup, v, 4096),
                seconds=time.perf_counter() - t0,
            )
        )
        if progress:
            print(
                f"  {v.name:32s} ppl {rows[-1]['perplexity']:.4f} ({rows[-1]['seconds']:.1f}s)",
                flush=True,
            )
    base, full = rows[0]["nll_per_token"], rows[1]["nll_per_token"]
    for r in rows:
        r["ppl_increase_pct"] = 100 * (math.exp(r["nll_per_token"] - base) - 1)
        r["share_of_codec_loss_pct"] = 100 * (r["nll_per_token"] - base) / (full - base)
        r["ratio_vs_bf16_4k"] = (r["bytes_4k"] / bf16_bytes) if r["bytes_4k"] else None
    _print(rows, codec, n_windows, context, stride, bf16_bytes)
    _print_channels(setup, stats)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "quality_breakdown.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out / 'quality_breakdown.csv'}")
    return rows, stats, setup


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _print(rows, codec, n_windows, context, stride, bf16_bytes):
    print(
        f"\ncodec {codec}; {n_windows} held-out windows of {context} tokens, last {stride} "
        f"scored ({rows[0]['tokens']} tokens); bf16 KV {bf16_bytes} B/token\n"
    )
    print(
        "| group | quantized subset | perplexity | vs bf16 | share of codec loss | "
        "B/token @1k | B/token @4k | vs bf16 @4k |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['group']} | {r['variant']} | {r['perplexity']:.3f} | "
            f"{r['ppl_increase_pct']:+.2f}% | {r['share_of_codec_loss_pct']:.0f}% | "
            f"{_fmt(r['bytes_1k'], '.0f')} | {_fmt(r['bytes_4k'], '.0f')} | "
            f"{_fmt(r['ratio_vs_bf16_4k'], '.1%')} |"
        )


def _print_channels(setup: Setup, stats: dict):
    """Per (layer, KV head): relative quantization error of K and V (model basis) and how much of
    K's logit-error energy the top-4 channels (by that energy / by K RMS) carry."""
    if not stats:
        return
    print("\nper-channel error of the codec (all quantized keys, model basis):")
    print(
        "| layer | KV head | K rel. err | V rel. err | K logit-err share of top-4 channels | "
        "same, top-4 RMS channels | K RMS max/median |"
    )
    print("|---|---|---|---|---|---|---|")
    for li, s in sorted(stats.items()):
        for h in range(s["ek2"].shape[0]):
            kerr = (s["ek2"][h].sum() / s["k2"][h].sum()).sqrt().item()
            verr = (s["ev2"][h].sum() / s["v2"][h].sum()).sqrt().item()
            logit = s["q2"][h] * s["ek2"][h]
            share = logit.sort(descending=True).values[:4].sum() / logit.sum()
            top = setup.outliers[(li, "k")][h, :4]
            rms_share = logit[top].sum() / logit.sum()
            rms = setup.outliers[(li, "k_rms")][h]
            print(
                f"| {li} | {h} | {kerr:.3f} | {verr:.3f} | {share:.1%} | {rms_share:.1%} | "
                f"{(rms.max() / rms.median()).item():.1f} |"
            )


def check_engine(
    codec: str = "hack2",
    model: str = DEFAULT_MODEL,
    context: int = 1024,
    stride: int = 512,
    n_windows: int = 2,
    text_dir: str | None = None,
) -> list:
    """This tool's all-quantized forward against the engine's compressed cache (`LLM.logits`,
    the path `zipserve bench quality` scores), per window: max / mean |logit difference| and the
    scored NLL per token of both. Logits differ at rare rounding ties (a code one step off when
    a key differs in its last bit between the two forwards), NLLs agree to ~1e-4."""
    from zipserve.engine.llm import LLM
    from zipserve.train.corpus import load_corpus

    config, net, tok = load(model)
    setup = Setup(net, config, codec, model_dir=model)
    llm = LLM(
        model, device="cpu", dtype="float32", codec=codec, num_pages=64, max_model_len=context + 1
    )
    out = []
    for ids in windows(tok, load_corpus(text_dir).held_out, n_windows, context):
        mine, ref = forward(setup, ids, Variant("all")), llm.logits(ids)
        rows = torch.arange(context - stride - 1, context - 1)
        tgt = torch.tensor(ids[context - stride :])
        n_mine, n_ref = (-torch.log_softmax(x, -1)[rows, tgt].mean().item() for x in (mine, ref))
        d = (mine - ref).abs()
        out.append((d.max().item(), d.mean().item(), n_mine, n_ref))
        print(
            f"engine vs fake-quant ({codec}): max |dlogit| {out[-1][0]:.2e}, mean "
            f"{out[-1][1]:.2e}; NLL/token fake-quant {n_mine:.5f}, engine {n_ref:.5f}"
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default="hack2")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512, help="tokens scored per window (the last)")
    ap.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip this many held-out windows (validate on fresh ones)",
    )
    ap.add_argument("--window", type=int, default=128, help="W of the recent/far position classes")
    ap.add_argument("--text-dir", default=None)
    ap.add_argument(
        "--sets", default="breakdown,experiments", help="comma list of: breakdown, experiments"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality_breakdown"))
    ap.add_argument(
        "--check-engine",
        action="store_true",
        help="only compare the all-quantized logits with the engine's and exit",
    )
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.check_engine:
        check_engine(a.codec, a.model, a.context, a.stride, a.windows, a.text_dir)
        return
    run(
        a.codec,
        a.model,
        a.windows,
        a.context,
        a.stride,
        a.text_dir,
        a.out,
        tuple(a.sets.split(",")),
        a.window,
        offset=a.offset,
    )


if __name__ == "__main__":
    main()
