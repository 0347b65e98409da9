"""Session 28, CPU: what importing one device-form layer costs the decode loop in torch calls made
from Python (each one releases and retakes the GIL), import_pages (ZIPSERVE_DEVICE_IMPORT=0)
against the one-copy import. The copy kernel's launch is stubbed out (on a GPU it is one call),
so the one-copy lane counts the GPU wrapper's host work on CPU tensors; the import_pages lane
does its copies on the CPU, so its host time includes them (the counts compare, the times only
roughly). random:tiny, one 1029-token prompt, 2 layers.

Run: PYTHONPATH=<dir holding zipserve> python3 bench/results/session28_cpu/count_calls.py
Output: count_calls.txt beside this file.
"""

import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from zipserve.engine import device_import  # noqa: E402
from zipserve.engine.config import EngineConfig  # noqa: E402
from zipserve.engine.disaggregated import DisaggregatedEngine  # noqa: E402
from zipserve.engine.sampling_params import SamplingParams  # noqa: E402
from zipserve.kernels import row_copy  # noqa: E402


class NoLaunch:
    """The kernel's launch, a no-op."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


row_copy._copy_rows_kernel = NoLaunch()
row_copy.require_runnable = lambda *a: None
device_import.copy_rows_ref = row_copy.copy_rows  # the GPU wrapper on CPU tensors

TOKENS = 1024 + 5
PARAMS = SamplingParams(max_tokens=1)


def engine(codec: str) -> DisaggregatedEngine:
    config = EngineConfig(
        codec=codec, cuda_graphs=False, num_pages=TOKENS // 16 + 4, prefix_caching=False
    )
    return DisaggregatedEngine(
        "random:tiny", device="cpu", max_model_len=TOKENS + 64, engine_config=config
    )


def import_all(dec: DisaggregatedEngine, layers, ids, rid: str, times: list | None = None):
    """Reserve, import every layer (each timed, or all under the profiler), give back."""
    dec.reserve(rid, ids, PARAMS, use_cache=False)
    for kv in layers:
        kv.request_id = rid
    if times is None:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for kv in layers:
                dec.import_layer(rid, kv)
    for kv in layers if times is not None else []:
        t0 = time.perf_counter()
        dec.import_layer(rid, kv)
        times.append(time.perf_counter() - t0)
    dec.abort(rid)
    return prof if times is None else None


for codec in ("bf16", "hack2", "kivi2"):
    pre, dec = engine(codec), engine(codec)
    ids = [3 + (i * 7919) % (pre.config.vocab_size - 3) for i in range(TOKENS)]
    layers = pre.prefill_export(ids, PARAMS, "p", device_form=True, use_cache=False).layers
    for kv in layers:
        kv.check()
    for mode in ("0", "1"):
        os.environ["ZIPSERVE_DEVICE_IMPORT"] = mode
        times: list[float] = []
        for rep in range(5):
            import_all(dec, layers, ids, f"t{mode}{rep}", times)
        print(f"{codec} one_copy={mode}: host {statistics.median(times) * 1e6:.0f} us per layer")
        prof = import_all(dec, layers, ids, f"p{mode}")
        top = [
            e
            for e in prof.events()
            if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        ]
        names: dict[str, int] = {}
        for e in top:
            names[e.name] = names.get(e.name, 0) + 1
        per_layer = sorted(((k, v / len(layers)) for k, v in names.items()), key=lambda x: -x[1])
        print(
            f"{codec} one_copy={mode}: {len(top) / len(layers):.1f} top-level aten calls a layer",
            [(k, round(v, 1)) for k, v in per_layer],
        )
    assert dec.pool.num_free == dec.pool.capacity and pre.pool.num_free == pre.pool.capacity
