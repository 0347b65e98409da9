"""`python3 -m zipserve.bench.decode_profile`: where one decode step's time goes, per codec lane.

For each lane (a codec, and for a quantized codec its decode-kv mode) the engine's decode step
runs eagerly (no CUDA graph, so the profiler sees every kernel) over a running batch set up as
`bench engine` does, under torch.profiler. Device time per step is summed by kernel name and by
kind (attention on codes, dense paged attention, split merge, matmuls, rotations, the rest), so
the gap between bf16 and a compressed codec's step reads off one table. The step is also timed
without the profiler. Prints a Markdown table, writes decode_profile.csv (every kernel) and
decode_profile_kinds.csv. On the CPU it profiles CPU ops (the torch references): a check of the
tool, not a measurement of the kernels.
"""

from __future__ import annotations

import argparse
import csv
import gc
import time
from pathlib import Path

import torch

from zipserve.bench.engine_bench import decode_seqs, decode_step, parse_lane
from zipserve.engine.config import EngineConfig
from zipserve.engine.llm_engine import LLMEngine

KINDS = (  # first match wins; matched against the lower-cased kernel / op name
    ("dense paged attention", ("paged_decode", "flash", "sdpa", "scaled_dot_product")),
    ("attention on codes", ("hack_decode", "kivi_decode", "fp8_decode", "lowrank_decode")),
    ("encode / dequantize", ("encode", "dequant", "quantize")),
    ("split merge", ("merge",)),
    ("rotation", ("hadamard", "rotat")),
    ("matmul", ("gemm", "matmul", "mm", "linear", "cutlass", "nvjet", "xmma")),
    (
        "norm / rope / elementwise",
        (
            "norm",
            "rope",
            "rotary",
            "elementwise",
            "silu",
            "mul",
            "add",
            "copy",
            "cat",
            "index",
            "fill",
        ),
    ),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def op_times(prof, device: torch.device) -> list[tuple[str, int, float]]:
    """(name, calls, us) of every kernel a torch.profiler run timed on a GPU (device time), or
    of every op on the CPU (self time); names with no time left out."""
    out = []
    for e in prof.key_averages():
        cuda = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        if device.type == "cuda" and not cuda:
            continue
        us = e.device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if us > 0:
            out.append((e.key, e.count, us))
    return out


def _engine(model: str, device: str, codec: str, mode: str, batch: int, context: int) -> LLMEngine:
    return LLMEngine(
        model,
        device=device,
        max_model_len=context + 64,
        engine_config=EngineConfig(
            codec=codec,
            decode_kv=mode,
            cuda_graphs=False,
            max_num_seqs=batch,
            graph_batch_sizes=(batch,),
        ),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_lane(
    model: str, device: str, lane: str, batch: int, context: int, steps: int
) -> tuple[float, list[dict]]:
    """(step ms without the profiler, one row per kernel/op name: calls and us per step)."""
    codec, mode = parse_lane(lane)
    engine = _engine(model, device, codec, mode, batch, context)
    seqs = decode_seqs(engine, batch, context)
    step = decode_step(engine, seqs, context)
    dev = engine.device
    try:
        for _ in range(3):
            step()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        acts = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            _sync(dev)
    finally:
        for s in seqs:
            engine.pool.free(s.pages, s.seq_id)
        assert engine.pool.num_free == engine.pool.capacity, "decode_profile leaked pages"
    rows = [
        dict(
            lane=lane,
            name=name,
            kind=kind_of(name),
            calls_per_step=count / steps,
            us_per_step=us / steps,
        )
        for name, count, us in op_times(prof, dev)
    ]
    rows.sort(key=lambda r: -r["us_per_step"])
    del engine, seqs, step  # the step closure holds the engine: drop every reference, so the
    gc.collect()  # next lane's pool is sized on free memory, not on this lane's leftovers
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return step_ms, rows


def run(
    model: str, device: str, lanes: list[str], batch: int, context: int, steps: int, out_dir: Path
) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    all_rows, summary = [], []
    for lane in lanes:
        step_ms, rows = profile_lane(model, device, lane, batch, context, steps)
        all_rows += rows
        kinds: dict[str, float] = {}
        for r in rows:
            kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["us_per_step"]
        summary.append(
            dict(
                lane=lane,
                step_ms=step_ms,
                profiled_us=sum(kinds.values()),
                launches=sum(r["calls_per_step"] for r in rows),
                **kinds,
            )
        )
        print(f"{lane}: eager step {step_ms:.2f} ms; top kernels:", flush=True)
        for r in rows[:8]:
            print(
                f"    {r['us_per_step']:9.1f} us  x{r['calls_per_step']:.0f}  [{r['kind']}] "
                f"{r['name'][:90]}"
            )
    kinds = [k for k, _ in KINDS] + ["other"]
    unit = "device" if device == "cuda" else "CPU self"
    print(
        f"\n{name}, model {model}, batch {batch} x context {context}, eager decode step, "
        f"{unit} time per step in us:\n"
    )
    print("| lane | step ms | launches | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for s in summary:
        print(
            f"| {s['lane']} | {s['step_ms']:.2f} | {s['launches']:.0f} | "
            + " | ".join(f"{s.get(k, 0.0):.0f}" for k in kinds)
            + " |"
        )
    with open(out_dir / "decode_profile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "batch", "context", *all_rows[0]])
        w.writeheader()
        for r in all_rows:
            w.writerow(dict(r, device=name, batch=batch, context=context))
    with open(out_dir / "decode_profile_kinds.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=[
                "device",
                "batch",
                "context",
                "lane",
                "step_ms",
                "profiled_us",
                "launches",
                *kinds,
            ],
        )
        w.writeheader()
        for s in summary:
            w.writerow(
                {
                    "device": name,
                    "batch": batch,
                    "context": context,
                    **{k: s.get(k, 0.0) for k in w.fieldnames[3:]},
                }
            )
    return summary


def main(argv: list[str] | None = None) -> None:
    from zipserve.deploy.cli import REFERENCE_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--lanes",
        default="bf16,hack2,hack2/dense,hack4",
        help="comma-separated codec[/decode-kv] lanes",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/decode_profile"))
    a = ap.parse_args(argv)
    if a.batch < 1 or a.context < 1 or a.steps < 1:
        ap.error("--batch, --context and --steps must be >= 1")
    run(a.model, a.device, [x for x in a.lanes.split(",") if x], a.batch, a.context, a.steps, a.out)


if __name__ == "__main__":
    main()
