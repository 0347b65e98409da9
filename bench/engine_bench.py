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
import gc
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


def parse_lane(text: str) -> tuple[str, str]:
    """'hack2' -> (hack2, compressed): attention on the codes; 'hack2/dense' -> (hack2, dense):
    the codec's values in the bf16 pool, the bf16 kernel."""
    codec, _, mode = text.partition("/")
    return codec, mode or "compressed"


def kv_bytes_per_token(engine: LLMEngine, context: int) -> float:
    """Bytes of KV one decode step reads per token of a sequence of `context` tokens: the
    codec's pages (and 16-bit tail) on codes, the pool's 16-bit values when decoded dense."""
    cfg = engine.config
    if engine.codec.dense_pages or engine.decode_kv == "dense":
        return cfg.kv_bytes_per_token(engine.dtype.itemsize)
    return engine.codec.bytes_per_token(cfg.num_kv_layers, context)


def max_batch(engine: LLMEngine, context: int) -> int:
    """Sequences of `context` tokens (+1 decoded) whose pages fit this engine's pool."""
    return engine.pool.capacity // pages_for(context + 1, engine.engine_config.page_size)


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
    kv_bytes = batch * (context + 1) * kv_bytes_per_token(engine, context + 1)
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
    lanes: list[str] | None = None,
) -> None:
    """Per lane (codec, or codec/dense): one engine with CUDA graphs for `batches`, every
    (context, batch) that fits its pool timed, the largest batch its pool holds per context, and
    one prefill. Lanes after the first are also given as ratios to the first."""
    if not torch.cuda.is_available():
        raise SystemExit("bench engine needs a CUDA GPU (run it on the lent device)")
    lanes = lanes or ["bf16"]
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    copy_bps, mm_flops = measure_device_rates(device)
    max_len = max(contexts) + 64
    rows, prefills = [], []
    for lane in lanes:
        codec, mode = parse_lane(lane)
        t0 = time.perf_counter()
        engine = LLMEngine(
            model,
            device="cuda",
            max_model_len=max(max_len, prefill_len + 64),
            engine_config=EngineConfig(
                codec=codec,
                decode_kv=mode,
                max_num_seqs=max(batches),
                graph_batch_sizes=tuple(sorted(batches)),
                max_prefill_tokens=prefill_len,
            ),
        )
        print(
            f"{lane}: engine ready in {time.perf_counter() - t0:.1f} s: {engine.pool.capacity} "
            f"pages of {engine.engine_config.page_size} tokens",
            flush=True,
        )
        for ctx in contexts:
            fits = max_batch(engine, ctx)
            for b in batches:
                if b > fits:
                    rows.append(dict(lane=lane, batch=b, context=ctx, max_batch=fits))
                    print(f"{lane} decode B={b:>3} ctx={ctx:>6}: does not fit ({fits} do)")
                    continue
                rows.append(dict(lane=lane, **bench_decode(engine, b, ctx, iters), max_batch=fits))
                print(f"{lane} {_fmt_decode(rows[-1])}", flush=True)
        prefills.append(dict(lane=lane, **bench_prefill(engine, prefill_len, 1, 5)))
        del engine
        gc.collect()
        torch.cuda.empty_cache()

    print(
        f"\ndevice: {name}; measured here: copy {copy_bps / 1e12:.2f} TB/s, "
        f"bf16 matmul {mm_flops / 1e12:.0f} TFLOP/s"
    )
    print(
        f"model: {model}; roofline reference {REF_COPY_BPS / 1e12:.1f} TB/s and "
        f"{REF_MATMUL_FLOPS / 1e12:.0f} TFLOP/s (H100, docs/gpu.md)\n"
    )
    for line in decode_table(rows, lanes, copy_bps):
        print(line)
    for pre in prefills:
        print(
            f"{pre['lane']} prefill {pre['prompt_len']} tokens: {pre['ms']:.1f} ms, "
            f"{pre['tokens_per_s']:.0f} tokens/s, {pre['tflops']:.0f} TFLOP/s = "
            f"{100 * pre['matmul_frac']:.0f}% of 685 TFLOP/s, "
            f"{100 * pre['tflops'] * 1e12 / mm_flops:.0f}% of measured"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "engine_decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["device", "copy_tbps_measured"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, device=name, copy_tbps_measured=copy_bps / 1e12))
    with open(out_dir / "engine_prefill.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(prefills[0]) + ["device", "matmul_tflops_measured"])
        w.writeheader()
        for pre in prefills:
            w.writerow(dict(pre, device=name, matmul_tflops_measured=mm_flops / 1e12))
    timed = [r for r in rows if "step_ms" in r]
    if timed:
        _plot(timed, out_dir / "engine_decode.png", name)


def decode_table(rows: list[dict], lanes: list[str], copy_bps: float) -> list[str]:
    """Markdown: one row per (lane, context, batch); tokens/s beside the first lane's at the
    same cell; "does not fit" where the lane's pool cannot hold the batch."""
    ref = {(r["context"], r["batch"]): r for r in rows if r["lane"] == lanes[0] and "step_ms" in r}
    out = [
        f"| lane | batch | context | step ms | tokens/s | vs {lanes[0]} | KV GB | TB/s | "
        "roofline % (3.0 TB/s) | % of measured copy | max batch in pool |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "step_ms" not in r:
            out.append(
                f"| {r['lane']} | {r['batch']} | {r['context']} | does not fit | | | | | | | "
                f"{r['max_batch']} |"
            )
            continue
        base = ref.get((r["context"], r["batch"]))
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "—"
        out.append(
            f"| {r['lane']} | {r['batch']} | {r['context']} | {r['step_ms']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {vs} | {r['kv_gb']:.1f} | {r['achieved_tbps']:.2f} | "
            f"{100 * r['roofline_frac']:.0f}% | "
            f"{100 * r['achieved_tbps'] * 1e12 / copy_bps:.0f}% | {r['max_batch']} |"
        )
    return out


def _fmt_decode(r: dict) -> str:
    return (
        f"decode B={r['batch']:>3} ctx={r['context']:>6}: {r['step_ms']:7.2f} ms/step "
        f"{r['achieved_tbps']:.2f} TB/s ({100 * r['roofline_frac']:.0f}% of 3.0 TB/s)"
    )


def _plot(rows: list[dict], path: Path, device: str) -> None:
    """Decode tokens/s against batch, one line per (lane, context)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lane in dict.fromkeys(r["lane"] for r in rows):
        for ctx in sorted({r["context"] for r in rows if r["lane"] == lane}):
            sel = [r for r in rows if r["context"] == ctx and r["lane"] == lane]
            ax.plot(
                [r["batch"] for r in sel],
                [r["tokens_per_s"] for r in sel],
                "o-",
                label=f"{lane}, context {ctx}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"zipserve decode step (CUDA graphs), {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
