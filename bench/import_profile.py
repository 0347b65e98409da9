"""`python3 -m zipserve.bench.import_profile`: what importing a received layer costs a decode
worker's step loop, per codec and decode-KV mode.

A prefill-side engine exports one prompt in the device form (what a prefill worker sends on a
GPU; on the CPU too, so the same path's host work can be counted there), its checksums settled;
a decode-side engine of the same codec (decode_kv compressed or dense) reserves the prompt and
imports every layer the way the step loop does (`import_layer`), then gives the reservation back.
Per lane: the host time of one layer's import (median over every layer of --repeats requests),
the wall time of a request's whole import with the device synchronized after it, and, from one
more request under torch.profiler, the aten calls per layer (nested ones counted too) and the ops
with the most host (CPU self) time, and the top-level aten calls per layer (the ones made from
Python: each releases the GIL, a chance for the decode worker's other threads to hold up its step
loop). Session 16's decode trace put an import at ~2 ms per layer on an H100 while its host work
on the CPU was 0.14-0.58 ms: this tells host from device and names the ops. A compressed lane
runs twice, through the one-copy import (engine/device_import.py, the default) and through
`import_pages` (ZIPSERVE_DEVICE_IMPORT=0); a dense lane always takes `import_pages`. On the CPU
the one-copy lane runs the copy's torch reference (a strided copy per tensor), so its counts
there are not a GPU's (bench/results/session28_cpu/count_calls.py counts the GPU wrapper's).
Prints a Markdown table, writes import_profile.csv. Every page of both engines must be back in its
pool at the end (the tool asserts it).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import time
from pathlib import Path

import torch

from zipserve.bench.engine_bench import parse_lane
from zipserve.engine.config import EngineConfig
from zipserve.engine.device_import import DEVICE_IMPORT_ENV
from zipserve.engine.disaggregated import DisaggregatedEngine
from zipserve.engine.sampling_params import SamplingParams

TOP_OPS = 4
"""Ops named per lane, by host time."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(model: str, device: str, codec: str, tokens: int, mode: str):
    # one request at a time: a pool for it, not the GPU
    pages = tokens // EngineConfig.page_size + 2
    return DisaggregatedEngine(
        model,
        device=device,
        max_model_len=tokens + 64,
        engine_config=EngineConfig(
            codec=codec, decode_kv=mode, cuda_graphs=False, num_pages=pages, prefix_caching=False
        ),
    )


def profile_lane(
    model: str, device: str, codec: str, mode: str, tokens: int, repeats: int, path: str
) -> dict:
    """One codec / decode-KV mode / import path ("one_copy" or "import_pages"): the import of one
    exported prompt, repeats + 2 times (the first one a warm-up), the last under torch.profiler."""
    os.environ[DEVICE_IMPORT_ENV] = "1" if path == "one_copy" else "0"
    prefill = _engine(model, device, codec, tokens, "compressed")
    decode = _engine(model, device, codec, tokens, mode)
    dev = decode.device
    vocab = prefill.config.vocab_size
    ids = [3 + (i * 7919) % (vocab - 3) for i in range(tokens)]
    params = SamplingParams(max_tokens=1)
    layers = prefill.prefill_export(ids, params, "p", device_form=True, use_cache=False).layers
    for kv in layers:
        kv.check()  # the step loop imports a layer once its checksum has settled

    per_layer, whole = [], []

    def import_request(i: int, timed: bool) -> None:
        rid = f"r{i}"
        decode.reserve(rid, ids, params, use_cache=False)
        _sync(dev)
        start = time.perf_counter()
        for kv in layers:
            kv.request_id = rid
            t = time.perf_counter()
            decode.import_layer(rid, kv)
            if timed:
                per_layer.append(time.perf_counter() - t)
        _sync(dev)
        if timed:
            whole.append(time.perf_counter() - start)
        decode.abort(rid)  # pages and slot back to the pool

    for i in range(1 + repeats):
        import_request(i, timed=i >= 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        import_request(1 + repeats, timed=False)
    aten = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    calls = sum(e.count for e in aten)
    top_level = [
        e
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    top = sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    n = len(layers)
    row = dict(
        codec=codec,
        decode_kv=mode,
        import_path=path,
        tokens=tokens,
        layers=n,
        host_ms_per_layer=statistics.median(per_layer) * 1e3,
        wall_ms_per_request=statistics.median(whole) * 1e3,
        aten_calls_per_layer=calls / n,
        python_calls_per_layer=len(top_level) / n,
        top_ops="; ".join(
            f"{e.key} x{e.count / n:.0f} {e.self_cpu_time_total / n / 1e3:.3f} ms" for e in top
        ),
    )
    ok = all(e.pool.num_free == e.pool.capacity for e in (prefill, decode))
    layers = prefill = decode = None  # drop both pools before the next lane sizes its own
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    assert ok, "import_profile: an engine leaked pages"
    return row


FIELDS = [
    "device",
    "codec",
    "decode_kv",
    "import_path",
    "tokens",
    "layers",
    "host_ms_per_layer",
    "wall_ms_per_request",
    "aten_calls_per_layer",
    "python_calls_per_layer",
    "top_ops",
]


def run(
    model: str, device: str, lanes: list[tuple[str, str]], tokens: int, repeats: int, out_dir: Path
) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    rows = []
    saved = os.environ.get(DEVICE_IMPORT_ENV)
    try:
        for codec, mode in lanes:
            for path in paths_of(mode):
                r = profile_lane(model, device, codec, mode, tokens, repeats, path)
                rows.append(r)
                print(
                    f"{lane_name(r)}: {r['host_ms_per_layer']:.3f} ms host per layer, "
                    f"{r['wall_ms_per_request']:.1f} ms per request of {r['layers']} layers "
                    f"(synchronized), {r['aten_calls_per_layer']:.0f} aten calls per layer, "
                    f"{r['python_calls_per_layer']:.0f} from Python",
                    flush=True,
                )
    finally:
        if saved is None:
            os.environ.pop(DEVICE_IMPORT_ENV, None)
        else:
            os.environ[DEVICE_IMPORT_ENV] = saved
    print(f"\n{name}, model {model}, one {tokens}-token prompt, median of {repeats} requests:\n")
    print(
        "| lane | host ms / layer | wall ms / request | aten calls / layer | from Python "
        "| top host ops |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {lane_name(r)} | {r['host_ms_per_layer']:.3f} | "
            f"{r['wall_ms_per_request']:.1f} | {r['aten_calls_per_layer']:.0f} | "
            f"{r['python_calls_per_layer']:.0f} | {r['top_ops']} |"
        )
    with open(out_dir / "import_profile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r | {"device": name})
    return rows


def paths_of(mode: str) -> tuple[str, ...]:
    """The import paths a lane runs: both for codes (compressed), import_pages for dense."""
    return ("one_copy", "import_pages") if mode == "compressed" else ("import_pages",)


def lane_name(row: dict) -> str:
    name = f"{row['codec']}/{row['decode_kv']}"
    return name + (
        " (import_pages)"
        if row["decode_kv"] == "compressed" and row["import_path"] == "import_pages"
        else ""
    )


def lanes_of(text: str) -> list[tuple[str, str]]:
    """ "bf16,kivi2/dense" -> [(bf16, compressed), (kivi2, dense)] (engine_bench's notation)."""
    return [parse_lane(s.strip()) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> None:
    from zipserve.deploy.cli import REFERENCE_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--lanes",
        default="bf16,hack2,kivi2/dense,hack2/dense",
        help="codec[/decode-kv] per lane, comma-separated (compressed by default)",
    )
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("out/import_profile"))
    args = ap.parse_args(argv)
    lanes = lanes_of(args.lanes)
    if not lanes:
        ap.error("--lanes: name at least one codec")
    if any(mode not in ("compressed", "dense") for _, mode in lanes):
        ap.error("--lanes: decode_kv must be compressed or dense")
    if args.tokens < 1 or args.repeats < 1:
        ap.error("--tokens and --repeats must be positive")
    run(args.model, args.device, lanes, args.tokens, args.repeats, args.out)


if __name__ == "__main__":
    main()
