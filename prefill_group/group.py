"""The N-rank process group of a prefill group, built beside (never through) torch.distributed's
global default group by the one process-group builder (transfer/group_builder.py): rank 0 hosts
a TCPStore, everything lives under a PrefixStore named after the group, and the backend object
(gloo on CPU, NCCL on GPU) is constructed directly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from zipserve.transfer.group_builder import (
    GroupSpec,
    build_group,
    loopback_gloo_hostname,
    rendezvous,
)
from zipserve.transfer.ports import release_port


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


def make_group(
    store_addr: str,
    port: int,
    rank: int,
    n: int,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    name: str = "prefill-group",
    device: torch.device | None = None,
) -> GroupHandle:
    """This rank's handle on an n-rank ProcessGroupGloo / ProcessGroupNCCL."""
    timeout = timedelta(seconds=timeout_s)
    spec = GroupSpec(
        backend, rank, n, timeout, gloo_hostname=loopback_gloo_hostname(store_addr), device=device
    )
    if rank == 0:  # this rank serves the store: a port held for it (transfer/ports.py) is let go
        release_port(port)
    try:
        tcp = rendezvous(store_addr, port, rank, n, timeout)
    except Exception as e:  # torch raises several types here
        raise GroupError(
            f"prefill group rank {rank}/{n}: cannot reach the store at {store_addr}:{port}: {e}"
        ) from e
    try:
        pg = build_group(dist.PrefixStore(f"zipserve/{name}/", tcp), spec)
    except Exception as e:
        raise GroupError(f"prefill group rank {rank}/{n}: {backend} backend failed: {e}") from e
    return GroupHandle(pg, tcp, rank, n, backend)
