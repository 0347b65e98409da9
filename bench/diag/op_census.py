"""What a decode step launches on a GPU, counted on the CPU: torch ops outside the kernels, per
source line, and Triton launches, per kernel, for one eager decode step of one lane.

Every small torch op in the step is at least one kernel on a GPU (a CUDA graph replays them all),
so this census finds the glue that costs a compressed lane its speed without spending device
time. It runs the GPU code path on the CPU: with TRITON_INTERPRET=1 the Triton kernels run in the
interpreter, and the codecs' `x if q.is_cuda else x_ref` choices are pointed at the kernels (each
module attribute `name_ref` whose kernels/ twin `name` exists is swapped; the model's fused
norm / rope / silu kernels are switched on as on a GPU). Ops inside a Triton
launch are not counted; argument checks that only run on the CPU (`q.device.type == "cpu"`) are,
so read those lines as free on a GPU.

    TRITON_INTERPRET=1 python3 bench/diag/op_census.py --lane lowrank+hack2

--model census (the default) is random:llama3-8b's layer shapes (32 / 8 heads of 128, bf16) with
2 layers and a small MLP and vocabulary, so a CPU step takes seconds; counts are per step (divide
the per-layer lines by 2).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import importlib
import os
import traceback
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

ROOT = str(Path(__file__).resolve().parents[2]) + os.sep
# ops that launch nothing on a GPU (views, metadata, allocation)
FREE = (
    "aten.detach",
    "aten.view",
    "aten._unsafe_view",
    "aten.t.",
    "aten.expand",
    "aten.slice",
    "aten.select",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.permute",
    "aten.as_strided",
    "aten.transpose",
    "aten.alias",
    "aten.lift_fresh",
    "aten.empty",
    "aten.split",
    "aten.unbind",
    "aten.chunk",
    "aten.reshape",
    "aten.unflatten",
    "aten.flatten",
    "aten.narrow",
    "aten.sym_",
)


def swap_references_for_kernels() -> int:
    """Point every `name_ref` attribute of the kernels, compress and engine modules at its
    kernels/ twin `name`; returns how many were swapped."""
    mods = []
    for sub in ("kernels", "compress", "engine"):
        for path in sorted(glob.glob(f"{ROOT}{sub}/*.py")):
            mods.append(importlib.import_module(f"zipserve.{sub}.{Path(path).stem}"))
    twins = {}  # id(reference) -> its kernel, taken before any module is changed
    for km in mods:
        if km.__name__.startswith("zipserve.kernels."):
            for name, ref in vars(km).items():
                twin = getattr(km, name[:-4], None) if name.endswith("_ref") else None
                if callable(ref) and callable(twin):
                    twins[id(ref)] = twin
    swapped = 0
    for m in mods:
        for name, obj in list(vars(m).items()):
            if name.endswith("_ref") and id(obj) in twins:
                setattr(m, name, twins[id(obj)])
                swapped += 1
    return swapped


class Census(TorchDispatchMode):
    """Counts torch ops by (innermost repository source line, op), outside Triton launches."""

    def __init__(self, launches: collections.Counter, inside: list[int]):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.launches, self.inside = launches, inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.inside[0] == 0 and not name.startswith(FREE):
            where = "?"
            for frame in reversed(traceback.extract_stack()):
                f = os.path.realpath(frame.filename)
                if f.startswith(ROOT) and not f.endswith("op_census.py"):
                    where = f"{f[len(ROOT) :]}:{frame.lineno} {frame.name}"
                    break
            self.ops[(where, name.split(".")[1])] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lane", default="lowrank+hack2", help="codec[/dense], as bench engine")
    ap.add_argument("--model", default="census")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (the kernels run in the interpreter on the CPU)")
    import triton.runtime.interpreter as interp

    from zipserve.engine import config as cfg

    cfg.RANDOM_MODELS.setdefault(
        "census",
        dataclasses.replace(
            cfg.RANDOM_MODELS["llama3-8b"],
            num_layers=2,
            intermediate_size=256,
            vocab_size=512,
            max_position_embeddings=4096,
            rope_scaling=None,
        ),
    )
    print(f"swapped {swap_references_for_kernels()} references for their kernels")
    from zipserve.engine import model as model_mod

    model_mod._fused = lambda x: True  # the model's norm / rope / silu kernels, as on a GPU
    from zipserve.bench.decode_profile import _engine
    from zipserve.bench.engine_bench import decode_seqs, decode_step, parse_lane

    launches: collections.Counter = collections.Counter()
    inside = [0]
    run = interp.InterpretedFunction.run

    def counted(self, *a, **k):
        launches[self.fn.__name__] += 1
        inside[0] += 1
        try:
            return run(self, *a, **k)
        finally:
            inside[0] -= 1

    interp.InterpretedFunction.run = counted
    model = args.model if args.model.startswith("random:") else f"random:{args.model}"
    codec, mode = parse_lane(args.lane)
    engine = _engine(model, "cpu", codec, mode, args.batch, args.context)
    seqs = decode_seqs(engine, args.batch, args.context)
    step = decode_step(engine, seqs, args.context)
    try:
        step()  # warm-up: first-call caches
        launches.clear()
        with Census(launches, inside) as census:
            step()
    finally:
        for s in seqs:
            engine.pool.free(s.pages, s.seq_id)
    total = sum(census.ops.values())
    print(f"{args.lane}: {total} torch ops + {sum(launches.values())} Triton launches per step")
    for name, n in launches.most_common():
        print(f"  {n:4d}  launch {name}")
    by_line: collections.Counter = collections.Counter()
    ops_at: dict[str, set] = collections.defaultdict(set)
    for (where, op), n in census.ops.items():
        by_line[where] += n
        ops_at[where].add(op)
    for where, n in by_line.most_common():
        print(f"  {n:4d}  {where}  ({', '.join(sorted(ops_at[where]))})")


if __name__ == "__main__":
    main()
