"""A prefill group as N local processes (torch.multiprocessing, spawn) over gloo or NCCL: the
in-process entry point for tests and benches, and what a backend without Ray can call.

`run_local(n, jobs)` starts the N ranks once, forms one process group, and runs every job (a
model + codec + prompts) through it in turn; one list of `GroupResult` per job. `run_threads`
does the same with the ranks as threads of the calling process (no start-up cost). A rank
failure surfaces as a RuntimeError with that rank's traceback (never a hang: the group has a
timeout).
"""

from __future__ import annotations

import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from zipserve.compress.lowrank_bases import LowRankBases
from zipserve.prefill_group.rank import GroupRank, RankResult
from zipserve.prefill_group.result import GroupResult, merge
from zipserve.transfer.ports import free_port, hold_free_port


@dataclass
class LocalJob:
    model: str
    codec: str
    prompts: list[list[int]]
    page_size: int = 64
    dtype: str | None = "auto"
    lowrank_exchange: bool = True
    max_positions: int | None = None
    keep_raw: bool = False
    all_logits: bool = False
    synthetic_rank: int | None = None
    """Timing only: exchange through random orthonormal bases of this rank (a model without
    calibrated bases, e.g. random:llama3-8b); the KV slices stay those of `codec`."""


def _run_rank(
    rank: int, n: int, port: int, jobs: list[LocalJob], device: str, timeout_s: float
) -> list[list[RankResult]]:
    dev = f"cuda:{rank}" if device == "cuda" else device
    first: GroupRank | None = None
    out = []
    for job in jobs:
        member = GroupRank(
            job.model,
            job.codec,
            rank,
            n,
            page_size=job.page_size,
            device=dev,
            dtype=job.dtype,
            max_positions=job.max_positions,
            lowrank_exchange=job.lowrank_exchange,
        )
        if job.synthetic_rank:
            member.bases = synthetic_bases(member.config, job.synthetic_rank, member.device)
        if first is None:
            member.connect("127.0.0.1", port, timeout_s=timeout_s)
            first = member
        else:
            member.share_group(first)
        out.append(
            [
                member.prefill(p, keep_raw=job.keep_raw, all_logits=job.all_logits)
                for p in job.prompts
            ]
        )
    return out


def synthetic_bases(config, rank: int, device) -> LowRankBases:
    """Random orthonormal [KVH, D, r] bases for every layer (same seed on every rank)."""
    gen = torch.Generator().manual_seed(0)
    kvh, d = config.num_kv_heads, config.head_dim
    if not 0 < rank <= d:
        raise ValueError(f"synthetic_rank: must be in 1..{d}, got {rank}")
    q = torch.linalg.qr(torch.randn(kvh, d, d, generator=gen))[0][..., :rank].contiguous()
    layer = {"k_enc": q, "k_dec": q, "v_enc": q, "v_dec": q}
    return LowRankBases([layer] * config.num_layers, {"synthetic_rank": rank})


def _rank_main(
    rank: int,
    n: int,
    port: int,
    out_dir: str,
    jobs: list[LocalJob],
    device: str,
    timeout_s: float,
    threads: int,
) -> None:
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        torch.set_num_threads(threads)
        torch.save({"ok": _run_rank(rank, n, port, jobs, device, timeout_s)}, path)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, path)
        raise


def _merge_all(n: int, jobs: list[LocalJob], per_rank) -> list[list[GroupResult]]:
    return [
        [merge([per_rank[r][j][i] for r in range(n)]) for i in range(len(job.prompts))]
        for j, job in enumerate(jobs)
    ]


def run_threads(
    n: int, jobs: list[LocalJob], device: str = "cpu", timeout_s: float = 60.0
) -> list[list[GroupResult]]:
    """The same group with its N ranks as threads of this process (each its own model copy and
    gloo/NCCL connection): no process start-up cost; for tests and one-host benches."""
    # held until rank 0's thread serves the store on it (same process: transfer/ports.py)
    port, per_rank, errors = hold_free_port(), [None] * n, [None] * n

    def body(rank: int) -> None:
        try:
            per_rank[rank] = _run_rank(rank, n, port, jobs, device, timeout_s)
        except BaseException:  # noqa: BLE001 - reported to the caller below, with the traceback
            errors[rank] = traceback.format_exc()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, err in enumerate(errors):
        if err is not None:
            raise RuntimeError(f"prefill group rank {r}/{n} failed:\n{err}")
    return _merge_all(n, jobs, per_rank)


def run_local(
    n: int, jobs: list[LocalJob], device: str = "cpu", timeout_s: float = 60.0, threads: int = 1
) -> list[list[GroupResult]]:
    """Every job through a group of n spawned processes (torch threads each: `threads`)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _rank_main,
            # spawned ranks are other processes: nothing here can hold the port for them
            args=(n, free_port(), tmp, jobs, device, timeout_s, threads),
            nprocs=n,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join():
                pass
        except mp.ProcessRaisedException:
            pass  # a rank raised: its own traceback is in its result file (read below)
        except mp.ProcessExitedException:
            pass  # a rank died without one: reported below as "no result"
        per_rank = []
        for r in range(n):
            f = Path(tmp) / f"rank{r}.pt"
            got = torch.load(f, weights_only=False) if f.exists() else {"error": "no result"}
            if "error" in got:
                raise RuntimeError(f"prefill group rank {r}/{n} failed:\n{got['error']}")
            per_rank.append(got["ok"])
    return _merge_all(n, jobs, per_rank)
