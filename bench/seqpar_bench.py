"""Sequence-parallel prefill (prefill_group/): bytes the Ulysses all-to-alls move per layer per
token with and without the low-rank (ZeroC) exchange, and prefill time of long prompts on N GPUs
against one.

  python3 -m zipserve.bench.seqpar_bench bytes            # CPU: formula + a measured bf16 run
  python3 -m zipserve.bench.seqpar_bench time --ns 1,2,4 --lens 32768,65536,131072  # N GPUs

`time` spawns N processes (one GPU each, NCCL); N=1 is the same forward without any exchange.
The low-rank rows of `time` use random orthonormal bases of --rank (random:llama3-8b has no
calibrated bases): the time is what the reduced exchange and attention cost, not a quality claim.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from zipserve.compress.lowrank_bases import LowRankBases
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.loading import model_config_for
from zipserve.prefill_group.exchange import expected_layer_bytes
from zipserve.prefill_group.local import LocalJob, run_local, run_threads


def _per_token(cfg, n, dq, dv, elem=2) -> dict[str, float]:
    b = expected_layer_bytes(cfg.num_heads, cfg.num_kv_heads, n, dq, dv, elem, 1)
    return {"qkv": b["qkv"], "out": b["out"], "total": b["qkv"] + b["out"]}


def byte_table(ns=(2, 4, 8)) -> list[dict]:
    """Bytes per layer per prompt token over the whole group, bf16 exchange."""
    rows = []
    ref = model_config_for(str(REFERENCE_MODEL))
    bases = LowRankBases.load(REFERENCE_MODEL)
    ranks = [(b["k_enc"].shape[-1], b["v_enc"].shape[-1]) for b in bases.layers]
    l8b = model_config_for("random:llama3-8b")
    for name, cfg, variants in [
        (
            "zipserve-ref",
            ref,
            [
                ("full", [(ref.head_dim, ref.head_dim)]),
                ("lowrank (calibrated, mean of layers)", ranks),
            ],
        ),
        (
            "llama3-8b shapes",
            l8b,
            [("full", [(128, 128)]), ("lowrank r=64 (illustrative)", [(64, 64)])],
        ),
    ]:
        for n in ns:
            if cfg.num_heads % n:
                continue
            full = None
            for label, rr in variants:
                per = [_per_token(cfg, n, rk, rv) for rk, rv in rr]
                avg = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
                full = full or avg["total"]
                rows.append(
                    {
                        "model": name,
                        "n": n,
                        "exchange": label,
                        "qkv": avg["qkv"],
                        "out": avg["out"],
                        "total": avg["total"],
                        "ratio": avg["total"] / full,
                    }
                )
    return rows


def measured_cpu(tokens: int = 256) -> list[dict]:
    """The counters of a real bf16 run of the reference model on CPU (threads, gloo)."""
    prompt = torch.randint(3, 8000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for n in (2, 4):
        jobs = [
            LocalJob(str(REFERENCE_MODEL), c, [prompt], page_size=32, dtype="bfloat16")
            for c in ("bf16", "lowrank")
        ]
        for job, res in zip(jobs, run_threads(n, jobs)):
            layers = len(res[0].records[0]) // 2
            per = res[0].sent_bytes() / layers / tokens
            rows.append(
                {
                    "n": n,
                    "exchange": job.codec,
                    "bytes_per_layer_token": per,
                    "qkv": res[0].sent_bytes("qkv") / layers / tokens,
                    "out": res[0].sent_bytes("out") / layers / tokens,
                }
            )
    return rows


def time_prefill(ns, lens, model, rank, out: Path, device: str = "cuda") -> list[dict]:
    """device "cuda": rank i on GPU i over NCCL; "cpu": gloo processes (a dry run of the same
    code path with a small model; its times say nothing about GPUs)."""
    rows = []
    cfg = model_config_for(model)
    for n in ns:
        for synthetic in (None, rank):
            if n == 1 and synthetic:
                continue
            jobs = [
                LocalJob(
                    model,
                    "bf16",
                    [torch.randint(3, 8000, (t,)).tolist()] * 2,
                    page_size=64,
                    max_positions=max(lens),
                    synthetic_rank=synthetic,
                )
                for t in lens
            ]
            for t, res in zip(lens, run_local(n, jobs, device=device, timeout_s=600)):
                r = res[1]  # the second run of the same prompt (the first warms up)
                rows.append(
                    {
                        "model": model,
                        "device": device,
                        "n": n,
                        "tokens": t,
                        "exchange": "full" if synthetic is None else f"lowrank r={rank}",
                        "seconds": r.seconds,
                        "exchange_bytes": r.sent_bytes(),
                        "bytes_per_layer_token": r.sent_bytes() / cfg.num_layers / t,
                    }
                )
                print(rows[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["bytes", "time"])
    ap.add_argument("--ns", default="1,2,4")
    ap.add_argument("--lens", default="32768,65536,131072")
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out", default="out/bench/seqpar_time.csv")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    if a.what == "bytes":
        print("| model | N | exchange | qkv B | out B | total B/layer/token | vs full |")
        print("|---|---|---|---|---|---|---|")
        for r in byte_table():
            print(
                f"| {r['model']} | {r['n']} | {r['exchange']} | {r['qkv']:.0f} | "
                f"{r['out']:.0f} | {r['total']:.0f} | {r['ratio']:.3f} |"
            )
        print("\nmeasured (reference model, bf16 on CPU, 256 tokens, counters of a real run):")
        print("| N | exchange | qkv B | out B | total B/layer/token |")
        print("|---|---|---|---|---|")
        for r in measured_cpu():
            print(
                f"| {r['n']} | {r['exchange']} | {r['qkv']:.1f} | {r['out']:.1f} | "
                f"{r['bytes_per_layer_token']:.1f} |"
            )
    else:
        time_prefill(
            [int(x) for x in a.ns.split(",")],
            [int(x) for x in a.lens.split(",")],
            a.model,
            a.rank,
            Path(a.out),
            a.device,
        )


if __name__ == "__main__":
    main()
