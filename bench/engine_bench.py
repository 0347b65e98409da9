"""`zipserve bench engine`: decode step time and prefill throughput against the memory and
matmul rooflines.

Decode: for each (batch, context) the running batch is set up directly (pages allocated, cache
contents irrelevant for speed) and the engine's decode step (CUDA graph forward + sampling) is
timed. The roofline is the bytes one step must read (weights + the batch's KV) over the copy rate.
Prefill: one packed forward of whole prompts; FLOPs of the matmuls plus causal attention over the
bf16 matmul rate. Both reference rates are the issue's H100 figures; the rates measured on this
device in the same run are printed beside them.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from zipserve.bench.plotting import pyplot
from zipserve.engine.config import EngineConfig
from zipserve.engine.llm_engine import LLMEngine
from zipserve.engine.page_pool import pages_for
from zipserve.engine.sampling_params import SamplingParams
from zipserve.engine.sequence import SeqStatus, Sequence

REF_COPY_BPS = 3.0e12  # H100 device-to-device copy, read + write (docs/gpu.md)
REF_MATMUL_FLOPS = 685e12  # H100 bf16 8192^3 (docs/gpu.md)


def measure_device_rates(device: torch.device) -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s) measured here and now."""
    x = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    copy_s = _time(lambda: y.copy_(x), 10)
    mm_s = _time(lambda: a @ a, 10)
    del x, y, a
    torch.cuda.empty_cache()
    return 2 * (1 << 31) / copy_s, 2 * 8192**3 / mm_s


def _time(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def decode_seqs(engine: LLMEngine, batch: int, context: int) -> list[Sequence]:
    """batch running sequences of `context` cached tokens each, pages allocated, slot i each
    (used by compressed caches), ready for engine.runner.decode."""
    seqs, p = [], engine.engine_config.page_size
    for i in range(batch):
        seq = Sequence(
            seq_id=10_000_000 + i,
            request_id=f"bench{i}",
            prompt_ids=[1] * context,
            params=SamplingParams(temperature=0.0, max_tokens=1 << 20),
            slot=i,
        )
        seq.output_ids = [1]
        pages = engine.pool.allocate(pages_for(context + 1, p), seq.seq_id)
        if pages is None:
            raise RuntimeError(f"batch {batch} x {context} does not fit the KV pool")
        seq.pages, seq.status, seq.num_cached = pages, SeqStatus.RUNNING, context
        seqs.append(seq)
    return seqs


def decode_step(engine: LLMEngine, seqs: list[Sequence], context: int):
    """One decode step of `seqs` (from decode_seqs) plus sampling, repeatable: each call resets
    the sequences to `context` cached tokens first."""
    params, gens = [s.params for s in seqs], [None] * len(seqs)

    def step():
        for s in seqs:
            s.num_cached = context
        logits = engine.runner.decode(seqs)
        engine.sampler.sample(logits, params, gens).token_ids.tolist()

    return step


def bench_decode(engine: LLMEngine, batch: int, context: int, iters: int) -> dict:
    seqs = decode_seqs(engine, batch, context)
    step = decode_step(engine, seqs, context)
    try:
        step_s = _time(step, iters)
    finally:
        for s in seqs:
            engine.pool.free(s.pages, s.seq_id)
    cfg = engine.config
    weight_bytes = (
        sum(
            p.numel() * p.element_size()
            for n, p in engine.model.named_parameters()
            if not n.startswith("embed_tokens")
        )
        + batch * cfg.hidden_size * 2
    )
    kv_bytes = batch * (context + 1) * cfg.kv_bytes_per_token(engine.cache.storage.element_size())
    return dict(
        batch=batch,
        context=context,
        step_ms=step_s * 1e3,
        tokens_per_s=batch / step_s,
        weight_gb=weight_bytes / 1e9,
        kv_gb=kv_bytes / 1e9,
        achieved_tbps=(weight_bytes + kv_bytes) / step_s / 1e12,
        roofline_frac=(weight_bytes + kv_bytes) / REF_COPY_BPS / step_s,
    )


def bench_prefill(engine: LLMEngine, prompt_len: int, num_prompts: int, iters: int) -> dict:
    cfg = engine.config
    seqs = []
    for i in range(num_prompts):
        seq = Sequence(
            seq_id=20_000_000 + i,
            request_id=f"pf{i}",
            prompt_ids=torch.randint(3, cfg.vocab_size, (prompt_len,)).tolist(),
            params=SamplingParams(max_tokens=1),
        )
        seq.pages = engine.pool.allocate(
            pages_for(prompt_len + 1, engine.engine_config.page_size), seq.seq_id
        )
        seqs.append(seq)

    def run():
        for s in seqs:
            s.num_cached = 0
        engine.runner.prefill(seqs)

    try:
        sec = _time(run, iters, warmup=1)
    finally:
        for s in seqs:
            engine.pool.free(s.pages, s.seq_id)
    tokens = prompt_len * num_prompts
    linear = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size  # embedding is a lookup
    flops = 2 * linear * tokens - 2 * cfg.vocab_size * cfg.hidden_size * (tokens - num_prompts)
    flops += num_prompts * cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * prompt_len**2
    return dict(
        prompt_len=prompt_len,
        prompts=num_prompts,
        ms=sec * 1e3,
        tokens_per_s=tokens / sec,
        tflops=flops / sec / 1e12,
        matmul_frac=flops / sec / REF_MATMUL_FLOPS,
    )


def run(
    model: str,
    batches: list[int],
    contexts: list[int],
    out_dir: Path,
    iters: int = 20,
    prefill_len: int = 8192,
) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench engine needs a CUDA GPU (run it on the lent device)")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    copy_bps, mm_flops = measure_device_rates(device)
    max_len = max(contexts) + 64
    t0 = time.perf_counter()
    engine = LLMEngine(
        model,
        device="cuda",
        max_model_len=max(max_len, prefill_len + 64),
        engine_config=EngineConfig(
            max_num_seqs=max(batches),
            graph_batch_sizes=tuple(sorted(batches)),
            max_prefill_tokens=prefill_len,
        ),
    )
    print(
        f"engine ready in {time.perf_counter() - t0:.1f} s: {engine.pool.capacity} pages "
        f"of {engine.engine_config.page_size} tokens"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for ctx in contexts:
        for b in batches:
            rows.append(bench_decode(engine, b, ctx, iters))
            print(_fmt_decode(rows[-1]), flush=True)
    pre = bench_prefill(engine, prefill_len, 1, 5)

    print(
        f"\ndevice: {name}; measured here: copy {copy_bps / 1e12:.2f} TB/s, "
        f"bf16 matmul {mm_flops / 1e12:.0f} TFLOP/s"
    )
    print(
        f"model: {model}; dtype {engine.dtype}; roofline reference {REF_COPY_BPS / 1e12:.1f} "
        f"TB/s and {REF_MATMUL_FLOPS / 1e12:.0f} TFLOP/s (H100, docs/gpu.md)\n"
    )
    print(
        "| batch | context | step ms | tokens/s | weights GB | KV GB | TB/s | roofline % "
        "(3.0 TB/s) | % of measured copy |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['context']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['weight_gb']:.1f} | {r['kv_gb']:.1f} | {r['achieved_tbps']:.2f} | "
            f"{100 * r['roofline_frac']:.0f}% | "
            f"{100 * r['achieved_tbps'] * 1e12 / copy_bps:.0f}% |"
        )
    print(
        f"\nprefill {pre['prompt_len']} tokens: {pre['ms']:.1f} ms, "
        f"{pre['tokens_per_s']:.0f} tokens/s, {pre['tflops']:.0f} TFLOP/s = "
        f"{100 * pre['matmul_frac']:.0f}% of 685 TFLOP/s, "
        f"{100 * pre['tflops'] * 1e12 / mm_flops:.0f}% of measured"
    )
    with open(out_dir / "engine_decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["device", "copy_tbps_measured"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, device=name, copy_tbps_measured=copy_bps / 1e12))
    with open(out_dir / "engine_prefill.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(pre) + ["device", "matmul_tflops_measured"])
        w.writeheader()
        w.writerow(dict(pre, device=name, matmul_tflops_measured=mm_flops / 1e12))
    _plot(rows, out_dir / "engine_decode.png", name)


def _fmt_decode(r: dict) -> str:
    return (
        f"decode B={r['batch']:>3} ctx={r['context']:>6}: {r['step_ms']:7.2f} ms/step "
        f"{r['achieved_tbps']:.2f} TB/s ({100 * r['roofline_frac']:.0f}% of 3.0 TB/s)"
    )


def _plot(rows: list[dict], path: Path, device: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for ctx in sorted({r["context"] for r in rows}):
        sel = [r for r in rows if r["context"] == ctx]
        ax.plot(
            [r["batch"] for r in sel],
            [100 * r["roofline_frac"] for r in sel],
            "o-",
            label=f"context {ctx}",
        )
    ax.axhline(70, color="gray", ls="--", label="goal 70%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("% of memory roofline (3.0 TB/s)")
    ax.set_title(f"zipserve decode step, {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
