"""The N-rank process group of a prefill group, built beside (never through) torch.distributed's
global default group: rank 0 hosts a TCPStore, everything lives under a PrefixStore named after
the group, and the backend object (gloo on CPU, NCCL on GPU) is constructed directly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from zipserve.transfer.tcp_store import tcp_store


@dataclass
class GroupHandle:
    pg: Any
    """The backend process group (ProcessGroupGloo / ProcessGroupNCCL)."""
    store: Any
    """The TCPStore (rank 0 serves it: it must live as long as the group)."""
    rank: int
    n: int
    backend: str


class GroupError(RuntimeError):
    """The group could not be formed (store unreachable, a rank missing, no backend)."""


def make_group(store_addr: str, port: int, rank: int, n: int, backend: str = "gloo",
               timeout_s: float = 60.0, name: str = "prefill-group",
               device: torch.device | None = None) -> GroupHandle:
    """This rank's handle on an n-rank ProcessGroupGloo / ProcessGroupNCCL."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    try:
        tcp = tcp_store(store_addr, port, n, rank == 0, timeout, wait_for_workers=True)
    except Exception as e:  # torch raises several types here
        raise GroupError(f"prefill group rank {rank}/{n}: cannot reach the store at "
                         f"{store_addr}:{port}: {e}") from e
    store = dist.PrefixStore(f"zipserve/{name}/", tcp)
    try:
        if backend == "gloo":
            gloo = dist.ProcessGroupGloo
            opts = gloo._Options()
            opts._devices = [gloo.create_device(hostname=store_addr)
                             if store_addr in ("127.0.0.1", "localhost")
                             else gloo.create_default_device()]
            opts._timeout = timeout
            pg = gloo(store, rank, n, opts)
        else:
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            if device is not None:
                torch.cuda.set_device(device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, n, opts)
    except Exception as e:
        raise GroupError(f"prefill group rank {rank}/{n}: {backend} backend failed: {e}") from e
    return GroupHandle(pg, tcp, rank, n, backend)
