"""The one builder of torch.distributed process groups (gloo or NCCL), and the store they form on.

Both users build their group beside (never through) torch.distributed's global default group:
the two-rank KV channel (transfer/process_group.py) and the N-rank prefill group
(prefill_group/group.py). Rank 0 serves a TCPStore (transfer/tcp_store.py), everything a group
writes to it lives under a PrefixStore named after the group, and the backend object is built
from a `GroupSpec` here. This is the only module that touches NCCL settings for them: the
environment (transfer/nccl_env.py) is applied before a communicator exists, and the
communicator's options (priority stream, watchdog timeout, device) are set from the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from zipserve.transfer.nccl_env import apply_nccl_defaults
from zipserve.transfer.tcp_store import tcp_store

BACKENDS = ("gloo", "nccl")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class BackendUnavailable(RuntimeError):
    """This process cannot build the asked-for backend (no gloo in torch; no CUDA or NCCL)."""


@dataclass(frozen=True)
class GroupSpec:
    """One rank's view of the group to build."""

    backend: str
    """"gloo" (CPU tensors) or "nccl" (CUDA tensors)."""
    rank: int
    size: int
    timeout: timedelta
    """gloo: every operation's timeout; nccl: the watchdog's."""
    gloo_hostname: str | None = None
    """The address gloo listens on; None: the host's default device (its resolved name)."""
    device: torch.device | None = None
    """nccl: made the current CUDA device before the communicator is built (None: as it is)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.size})")


def loopback_gloo_hostname(store_addr: str) -> str | None:
    """127.0.0.1 when the store is on loopback (every rank on this machine: gloo then listens
    on loopback only), else None (the default device, reachable from other hosts)."""
    return "127.0.0.1" if store_addr in LOOPBACK_HOSTS else None


def rendezvous(store_addr: str, port: int, rank: int, size: int, timeout: timedelta) -> Any:
    """The group's TCPStore: rank 0 serves it at store_addr:port (it must live as long as the
    group), the others dial it. Raises whatever torch raises when it cannot be reached. Put a
    group's keys under a `dist.PrefixStore` named after it, so groups can share one store."""
    return tcp_store(store_addr, port, size, rank == 0, timeout, wait_for_workers=True)


def build_group(store: Any, spec: GroupSpec) -> Any:
    """The backend process group (ProcessGroupGloo / ProcessGroupNCCL) of this rank over
    `store`; blocks until every rank joined. Raises BackendUnavailable, or the backend's own
    error when forming the group fails."""
    if spec.backend == "gloo":
        return _gloo(store, spec)
    return _nccl(store, spec)


def _gloo(store: Any, spec: GroupSpec) -> Any:
    if not dist.is_available() or not dist.is_gloo_available():
        raise BackendUnavailable("this torch build has no gloo backend")
    gloo = dist.ProcessGroupGloo
    try:
        opts = gloo._Options()
    except AttributeError:  # an older/newer binding without _Options: default device only
        return gloo(store, spec.rank, spec.size, spec.timeout)
    opts._devices = [
        gloo.create_device(hostname=spec.gloo_hostname)
        if spec.gloo_hostname
        else gloo.create_default_device()
    ]
    opts._timeout = spec.timeout
    return gloo(store, spec.rank, spec.size, opts)


def _nccl(store: Any, spec: GroupSpec) -> Any:
    if not (dist.is_available() and torch.cuda.is_available() and dist.is_nccl_available()):
        raise BackendUnavailable("the nccl backend needs CUDA and a torch build with NCCL")
    apply_nccl_defaults()
    if spec.device is not None:
        torch.cuda.set_device(spec.device)
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    opts._timeout = spec.timeout
    return dist.ProcessGroupNCCL(store, spec.rank, spec.size, opts)
