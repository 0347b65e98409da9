"""`python3 -m zipserve.bench.prefill_profile`: what a prefill worker's prompt costs per codec, and
how much of it is the export of its KV.

For each codec, a prefill-side engine (engine/disaggregated.py, as a prefill worker builds it) runs
`prefill_export` of one prompt, the way the worker does (device form on a GPU: the KV stays on the
device for the transfer), and the same prompt with the per-layer export left out (the forward alone).
Both are timed after warm-up (synchronized, median of --repeats); the difference is what exporting
costs, the number the issue-16 JCT runs could not split out (a compressed lane's prefill phase ran
~100 ms longer than bf16's on an H100 with the same forward). One exporting run also goes through
torch.profiler: device time by kind (encode, matmul, attention, the export's gathers and checksum
...) and the host time spent inside export_layer, under torch's sync debug mode too: every place
the host waited for the GPU (bench/host_syncs.py; the sampler's one wait for the first token is
expected, any other one idles the GPU for the launches after it). Prints a Markdown table, writes
prefill_profile.csv. On the CPU the numbers are the torch references' (a check of the tool).
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from zipserve.bench.decode_profile import KINDS, kind_of, op_times
from zipserve.bench.host_syncs import host_syncs, summary
from zipserve.engine import disaggregated
from zipserve.engine.config import EngineConfig
from zipserve.engine.disaggregated import DisaggregatedEngine
from zipserve.engine.sampling_params import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _export(host_s: list[float], skip: bool):
    """Wrap engine/disaggregated.py's per-layer export: add export_layer's host time to
    host_s[0]; skip: leave the export out (the forward alone)."""
    real, real_held = disaggregated.export_layer, disaggregated.held_nbytes

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return None if skip else real(*args, **kwargs)
        finally:
            host_s[0] += time.perf_counter() - t

    disaggregated.export_layer = timed
    if skip:
        disaggregated.held_nbytes = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        disaggregated.export_layer, disaggregated.held_nbytes = real, real_held


def profile_codec(model: str, device: str, codec: str, tokens: int, repeats: int) -> dict:
    engine = DisaggregatedEngine(
        model,
        device=device,
        max_model_len=tokens + 64,
        engine_config=EngineConfig(codec=codec, cuda_graphs=False),
    )
    dev = engine.device
    form = dev.type == "cuda"  # what a prefill worker sends on a GPU (transfer/pairing.py)
    vocab = engine.config.vocab_size
    ids = [3 + (i * 7919) % (vocab - 3) for i in range(tokens)]
    params = SamplingParams(max_tokens=1)
    host = [0.0]

    def once(i: int, export: bool) -> tuple[float, int]:
        _sync(dev)
        t = time.perf_counter()
        res = engine.prefill_export(
            ids, params, f"p{i}", device_form=form, use_cache=False
        )  # every layer exported (or not) before it returns
        _sync(dev)
        seconds = time.perf_counter() - t
        wire = sum(kv.nbytes() for kv in res.layers if kv is not None) if export else 0
        return seconds, wire

    with_export, forward_only, wire = [], [], 0
    for i in range(2 + repeats):  # 2 warm-ups: kernels compiled, allocator sized, both ways
        with _export(host, skip=False):
            s, wire = once(i, True)
        with _export(host, skip=True):
            f = once(i, False)[0]
        if i >= 2:
            with_export.append(s)
            forward_only.append(f)
    host[0] = 0.0
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with (
        _export(host, skip=False),
        torch.profiler.profile(activities=acts) as prof,
        host_syncs(dev) as waits,
    ):
        once(2 + repeats, True)
    kinds: dict[str, float] = {}
    for name, _, us in op_times(prof, dev):
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + us
    pool_ok = engine.pool.num_free == engine.pool.capacity
    engine = None  # drop the pool before the next codec's engine sizes its own
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    assert pool_ok, "prefill_profile: the prefill engine leaked pages"
    with_ms = statistics.median(with_export) * 1e3
    fwd_ms = statistics.median(forward_only) * 1e3
    return dict(
        codec=codec,
        tokens=tokens,
        device_form=form,
        prefill_ms=with_ms,
        forward_ms=fwd_ms,
        export_ms=with_ms - fwd_ms,
        export_host_ms=host[0] * 1e3,
        wire_mb=wire / 1e6,
        host_waits=len(waits),
        waits=summary(waits),
        **{k: us / 1e3 for k, us in kinds.items()},
    )


def run(
    model: str, device: str, codecs: list[str], tokens: int, repeats: int, out_dir: Path
) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    rows = []
    for codec in codecs:
        r = profile_codec(model, device, codec, tokens, repeats)
        rows.append(r)
        print(
            f"{codec}: prefill {r['prefill_ms']:.1f} ms, forward alone {r['forward_ms']:.1f} ms, "
            f"export {r['export_ms']:+.1f} ms (host {r['export_host_ms']:.1f} ms), "
            f"{r['wire_mb']:.1f} MB; host {r['waits']}",
            flush=True,
        )
    kinds = [k for k, _ in KINDS] + ["other"]
    unit = "device" if device == "cuda" else "CPU self"
    print(
        f"\n{name}, model {model}, one {tokens}-token prompt, median of {repeats}; kinds: {unit} "
        f"ms of one exporting prefill:\n"
    )
    print(
        "| codec | prefill ms | forward alone ms | export ms | export host ms | wire MB | host waits | "
        + " | ".join(kinds)
        + " |"
    )
    print("|---|---|---|---|---|---|---|" + "---|" * len(kinds))
    for r in rows:
        print(
            f"| {r['codec']} | {r['prefill_ms']:.1f} | {r['forward_ms']:.1f} | "
            f"{r['export_ms']:+.1f} | {r['export_host_ms']:.1f} | {r['wire_mb']:.1f} | {r['host_waits']} | "
            + " | ".join(f"{r.get(k, 0.0):.1f}" for k in kinds)
            + " |"
        )
    fields = ["device", "codec", "tokens", "device_form", "prefill_ms", "forward_ms", "export_ms"]
    fields += ["export_host_ms", "wire_mb", "host_waits", "waits", *kinds]
    with open(out_dir / "prefill_profile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, 0.0) for k in fields} | {"device": name})
    return rows


def main(argv: list[str] | None = None) -> None:
    from zipserve.deploy.cli import REFERENCE_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--codecs", default="bf16,hack2,hack4,kivi2")
    ap.add_argument("--tokens", type=int, default=8192, help="prompt length")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/prefill_profile"))
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.repeats < 1:
        ap.error("--tokens and --repeats must be >= 1")
    codecs = [c for c in a.codecs.split(",") if c]
    if not codecs:
        ap.error("--codecs: name at least one codec")
    run(a.model, a.device, codecs, a.tokens, a.repeats, a.out)


if __name__ == "__main__":
    main()
