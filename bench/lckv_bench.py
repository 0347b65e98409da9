"""`zipserve bench lckv`: what layer-condensed KV buys a decode GPU under a fixed KV memory budget,
and what its iterative prompt encoding costs.

For each (model, codec): the largest batch whose KV (pages for context + the timed steps, plus the
16-bit open page and sinks of each sequence's slot for compressed codecs) fits `budget_gb`; the
running batch is set up directly (cache contents do not matter for speed) and the decode step
(forward + sampling) is timed. Prefill: one prompt of `prefill_len` tokens through the engine's
prefill (LCKV: m + b passes over its condensed stack, or token by token when shorter). Ratios are
against the first model at the same codec, measured side by side in one run.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from zipserve.bench.engine_bench import decode_seqs
from zipserve.bench.plotting import pyplot
from zipserve.engine.config import EngineConfig
from zipserve.engine.kv_memory import bytes_per_page
from zipserve.engine.llm_engine import LLMEngine
from zipserve.engine.loading import model_config_for
from zipserve.engine.page_pool import pages_for
from zipserve.engine.sampling_params import SamplingParams
from zipserve.engine.sequence import Sequence

PAGE = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def seq_bytes(model: str, codec: str, context: int, dtype_bytes: int = 2) -> tuple[int, float]:
    """(KV bytes one sequence of `context` tokens holds, KV bytes per token of full pages)."""
    from zipserve.compress.codecs import make_codec

    cfg = model_config_for(model)
    dtype = torch.bfloat16 if dtype_bytes == 2 else torch.float32
    c = make_codec(
        codec,
        cfg.num_kv_heads,
        PAGE,
        cfg.head_dim,
        model_dir=None if model.startswith("random:") else model,
    )
    mode = "dense" if c.dense_pages else "compressed"  # what the benched engines keep
    page = bytes_per_page(c, mode, cfg, PAGE, dtype)
    slot = (
        0
        if mode == "dense"
        else (
            cfg.num_kv_layers
            * 2
            * cfg.num_kv_heads
            * (PAGE + max(c.n_sink, 1))
            * cfg.head_dim
            * dtype_bytes
        )
    )
    return pages_for(context, PAGE) * page + slot, page / PAGE


def bench_one(
    model: str,
    codec: str,
    budget_gb: float,
    context: int,
    prefill_len: int,
    max_batch: int,
    iters: int,
    device: torch.device,
    cuda_graphs: bool,
) -> dict:
    per_seq, bpt = seq_bytes(model, codec, context + 1)
    batch = max(1, min(max_batch, int(budget_gb * 2**30) // per_seq))
    ec = EngineConfig(
        codec=codec,
        page_size=PAGE,
        max_num_seqs=batch,
        num_pages=batch * pages_for(context + 1, PAGE) + pages_for(prefill_len + 1, PAGE) + 1,
        graph_batch_sizes=(batch,),
        cuda_graphs=cuda_graphs,
        max_prefill_tokens=max(prefill_len, 1),
    )
    engine = LLMEngine(
        model, device=device, engine_config=ec, max_model_len=max(context, prefill_len) + 2
    )
    cfg = engine.config

    # Prefill of one prompt (its pages are freed before the decode batch is set up).
    prompt = torch.randint(
        3, cfg.vocab_size, (prefill_len,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    pseq = Sequence(
        seq_id=40_000_000,
        request_id="prefill",
        prompt_ids=prompt,
        params=SamplingParams(max_tokens=1),
        slot=0,
    )
    pseq.pages = engine.pool.allocate(pages_for(prefill_len + 1, PAGE), pseq.seq_id)

    def prefill():
        pseq.num_cached = 0
        engine.runner.prefill([pseq])

    try:
        prefill_s = _time(prefill, device, 3, warmup=1)
    finally:
        engine.pool.free(pseq.pages, pseq.seq_id)

    seqs = decode_seqs(engine, batch, context)
    params, gens = [s.params for s in seqs], [None] * batch

    def step():
        for s in seqs:
            s.num_cached = context
        logits = engine.runner.decode(seqs)
        engine.sampler.sample(logits, params, gens).token_ids.tolist()

    try:
        step_s = _time(step, device, iters)
    finally:
        for s in seqs:
            engine.pool.free(s.pages, s.seq_id)
    row = dict(
        model=model,
        codec=codec,
        kv_layers=cfg.num_kv_layers,
        layers=cfg.num_layers,
        kv_bytes_per_token=round(bpt, 1),
        kv_mb_per_seq=per_seq / 2**20,
        batch=batch,
        step_ms=step_s * 1e3,
        tokens_per_s=batch / step_s,
        graphs=engine.runner.graphs is not None,
        prefill_len=prefill_len,
        prefill_ms=prefill_s * 1e3,
    )
    return row


def run(
    models: list[str],
    codecs: list[str],
    budget_gb: float,
    context: int,
    prefill_len: int,
    out_dir: Path,
    max_batch: int = 4096,
    iters: int = 10,
    device: str | None = None,
    cuda_graphs: bool = True,
) -> list[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []
    for codec in codecs:
        for model in models:
            rows.append(
                bench_one(
                    model,
                    codec,
                    budget_gb,
                    context,
                    prefill_len,
                    max_batch,
                    iters,
                    dev,
                    cuda_graphs,
                )
            )
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # the engine of that run is gone
            r = rows[-1]
            print(
                f"{Path(model).name} {codec}: batch {r['batch']}, {r['step_ms']:.2f} ms/step, "
                f"{r['tokens_per_s']:.0f} tok/s, prefill {r['prefill_ms']:.1f} ms",
                flush=True,
            )
    base = {r["codec"]: r for r in rows if r["model"] == models[0]}
    for r in rows:
        b = base[r["codec"]]
        r["throughput_x"] = r["tokens_per_s"] / b["tokens_per_s"]
        r["kv_bytes_x"] = r["kv_bytes_per_token"] / b["kv_bytes_per_token"]
        r["prefill_x"] = r["prefill_ms"] / b["prefill_ms"]
    print(
        f"\ndevice: {name}; KV budget {budget_gb} GiB, context {context}, "
        f"prefill {prefill_len} tokens; ratios against {Path(models[0]).name} at the same codec"
    )
    print(
        "| model | codec | KV layers | KV bytes/token | batch | step ms | tokens/s | "
        "throughput x | prefill ms | prefill x |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {Path(r['model']).name} | {r['codec']} | {r['kv_layers']}/{r['layers']} | "
            f"{r['kv_bytes_per_token']:.0f} ({r['kv_bytes_x']:.2f}x) | {r['batch']} | "
            f"{r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['throughput_x']:.2f} | "
            f"{r['prefill_ms']:.1f} | {r['prefill_x']:.2f} |"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "lckv.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["device"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, device=name))
    _plot(rows, out_dir / "lckv.png", name, budget_gb, context)
    return rows


def _plot(rows: list[dict], path: Path, device: str, budget_gb: float, context: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{Path(r['model']).name}\n{r['codec']}" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows])
    for i, r in enumerate(rows):
        ax.text(i, r["tokens_per_s"], f"B={r['batch']}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(
        f"decode at the largest batch in {budget_gb} GiB of KV, context {context}, {device}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
