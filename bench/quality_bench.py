"""`zipserve bench quality`: what each codec costs in model quality, and what it saves in bytes.

Per codec, on the reference model's held-out split: perplexity with every token attending to the
encoded pages before its own page (the decode-time view), greedy-token agreement with bf16 over
`gen_tokens` generated tokens from held-out prompts, and bytes per token (full pages only, and at
the scoring context with the 16-bit open page and sinks amortized in). Writes CSV + PNG.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from zipserve.bench.plotting import pyplot
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.engine.perplexity import perplexity
from zipserve.train.corpus import load_corpus


def _agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions before the first divergence, over the reference length."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(1, len(b))


def run(
    model: str,
    codecs: list[str],
    out_dir: Path,
    text_dir: str | None = None,
    context: int = 1024,
    stride: int = 512,
    gen_tokens: int = 256,
    num_prompts: int = 8,
    device: str | None = None,
    dtype: str = "float32",
) -> list[dict]:
    corpus = load_corpus(text_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, ref_tokens = [], None
    prompts = None
    for codec in ["bf16"] + [c for c in codecs if c != "bf16"]:
        t0 = time.perf_counter()
        llm = LLM(
            model,
            device=device,
            dtype=dtype,
            codec=codec,
            num_pages=1024,
            max_model_len=max(context, 512 + gen_tokens) + 1,
        )
        eng = llm.engine
        docs = [llm.tokenizer.encode(d.text) for d in corpus.held_out]
        if prompts is None:  # 512-token prompts from the held-out files
            prompts = [d[:512] for d in docs if len(d) >= 512][:num_prompts]
        ppl = perplexity(llm.logits, docs, context=context, stride=stride, progress=False)
        outs = llm.generate(
            prompts, SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
        )
        toks = [o.token_ids for o in outs]
        if ref_tokens is None:
            ref_tokens = toks
        agree = sum(_agreement(a, b) for a, b in zip(toks, ref_tokens)) / len(toks)
        exact = sum(x == y for a, b in zip(toks, ref_tokens) for x, y in zip(a, b)) / sum(
            map(len, ref_tokens)
        )
        cfg = eng.config
        full = eng.codec.bytes_per_token(cfg.num_kv_layers)  # bf16: cfg.kv_bytes_per_token(2)
        ctx = eng.codec.bytes_per_token(cfg.num_kv_layers, seq_len=context)
        if eng.pool.num_free != eng.pool.capacity:
            raise RuntimeError(f"{codec}: pages leaked during the benchmark")
        rows.append(
            dict(
                codec=codec,
                perplexity=ppl.perplexity,
                tokens_scored=ppl.tokens,
                greedy_prefix_agreement=agree,
                greedy_position_match=exact,
                bytes_per_token_pages=full,
                bytes_per_token_at_context=ctx,
                ratio_vs_bf16=cfg.kv_bytes_per_token(2) / full,
                seconds=time.perf_counter() - t0,
            )
        )
        del llm, eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(
            f"{codec:>8}: ppl {ppl.perplexity:.3f}  agreement {agree:.3f}  "
            f"bytes/token {full:.0f} ({ctx:.0f} at {context})",
            flush=True,
        )
    base = rows[0]["perplexity"]
    for r in rows:
        r["ppl_increase_pct"] = 100 * (r["perplexity"] / base - 1)
    _write(rows, out_dir, model, context, gen_tokens)
    return rows


def _write(rows: list[dict], out_dir: Path, model: str, context: int, gen_tokens: int) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"\nmodel {model}; device {device}; perplexity at context {context}; agreement over "
        f"{gen_tokens} greedy tokens\n"
    )
    print(
        "| codec | perplexity | vs bf16 | greedy prefix agreement | position match | "
        "bytes/token (pages) | bytes/token at context | ratio vs bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['codec']} | {r['perplexity']:.3f} | {r['ppl_increase_pct']:+.2f}% | "
            f"{r['greedy_prefix_agreement']:.3f} | {r['greedy_position_match']:.3f} | "
            f"{r['bytes_per_token_pages']:.0f} | {r['bytes_per_token_at_context']:.0f} | "
            f"{r['ratio_vs_bf16']:.2f}x |"
        )
    with open(out_dir / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["model", "device"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, model=model, device=device))
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["bytes_per_token_pages"], r["perplexity"])
        ax.annotate(
            r["codec"],
            (r["bytes_per_token_pages"], r["perplexity"]),
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV bytes per token (all layers, full pages)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"codec quality vs size ({Path(model).name})")
    fig.tight_layout()
    fig.savefig(out_dir / "quality.png", dpi=120)
    print(f"wrote {out_dir / 'quality.csv'} and quality.png")
