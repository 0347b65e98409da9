"""The transport table: every KV path a prefill/decode pair can take, what it needs of the two
endpoints, and how it is opened over the pair's control channel.

A pair first connects a gloo control channel (transfer/pairing.py); each side's `Endpoint`
(transfer/select.py) travels in that handshake, and `choose_path` maps the two to one row of
`TRANSPORTS`, the same on both sides (it is symmetric):
  - "host": LayerKV bytes over the gloo control channel itself (either side on the CPU, or
    asked for);
  - "cuda_ipc": both on the same physical GPU of one host, in different processes: device
    buffers shared through CUDA IPC handles, gloo as the control path;
  - "nccl": both on CUDA, different GPUs (or hosts): a second, two-rank NCCL process group;
  - "nccl_ctypes" (only when asked for): the same over our ctypes binding on our own stream.
Unasked ("auto"), the possible row of highest `priority` wins. A path asked for must be asked for
by both sides (or one side and "auto") and be possible, else TransferError says what it needs.
Two engines in ONE process do not pair through here: they share an InProcessChannel.

What the opened channel then carries (device tensors or host bytes, leases, acknowledgements)
its class declares (transfer/channel.py). Adding a transport: its Channel class and one row here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zipserve.transfer.channel import Channel, TransferError
from zipserve.transfer.process_group import ProcessGroupChannel
from zipserve.transfer.select import (
    Endpoint,
    describe_endpoint,
    nccl_between,
    same_gpu,
    same_process,
)


@dataclass(frozen=True)
class PairSetup:
    """What an opener has to build a transport from: the connected control channel and the
    rendezvous it was formed on."""

    control: ProcessGroupChannel
    device: str
    """This worker's engine device ("cpu", "cuda", "cuda:1")."""
    host: str
    port: int
    rank: int
    """0: the prefill side (sends KV), 1: the decode side."""
    pair_name: str
    timeout_s: float

    def cuda_device(self) -> torch.device:
        dev = torch.device(self.device)
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


@dataclass(frozen=True)
class Transport:
    path: str
    needs: str
    """What it needs, for the error when it is asked for and impossible."""
    possible: Callable[[Endpoint, Endpoint], bool]
    open: Callable[[PairSetup], Channel]
    """Builds the channel; takes over the control channel (closes it when it does not keep
    it). Raises TransferError."""
    priority: int | None
    """Unasked, the possible transport of highest priority is taken; None: only when asked."""


def _open_host(setup: PairSetup) -> Channel:
    return setup.control


def _open_cuda_ipc(setup: PairSetup) -> Channel:
    from zipserve.transfer.cuda_ipc import KEEP_MAPPED_ENV, CudaIpcChannel

    return CudaIpcChannel(
        setup.control,
        setup.cuda_device(),
        ack_timeout_s=setup.timeout_s,
        keep_mapped=os.environ.get(KEEP_MAPPED_ENV, "0") == "1",
    )


def _open_nccl_group(setup: PairSetup) -> Channel:
    """The KV group forms on the control group's store (its rendezvous)."""
    try:
        data = ProcessGroupChannel(
            setup.host,
            setup.port,
            setup.rank,
            backend="nccl",
            device=setup.cuda_device(),
            timeout_s=setup.timeout_s,
            pair_name=f"{setup.pair_name}/nccl",
            store=setup.control.rendezvous_store,
        )
    except TransferError:
        raise
    except Exception as e:
        raise TransferError(f"cannot build the NCCL group of pair {setup.pair_name}: {e}") from e
    setup.control.close()
    return data


def _open_nccl_ctypes(setup: PairSetup) -> Channel:
    """Our binding: rank 0's unique id travels through the pair's store."""
    from zipserve.transfer import nccl
    from zipserve.transfer.nccl_channel import NcclChannel

    store = setup.control.pair_store
    try:
        if setup.rank == 0:
            store.set("nccl_uid", nccl.get_unique_id())
        comm = nccl.NcclComm(bytes(store.get("nccl_uid")), 2, setup.rank, setup.cuda_device())
    except Exception as e:
        raise TransferError(
            f"cannot build the NCCL communicator of pair {setup.pair_name}: {e}"
        ) from e
    setup.control.close()
    return NcclChannel(comm, 1 - setup.rank, "send" if setup.rank == 0 else "recv", setup.timeout_s)


TRANSPORTS: dict[str, Transport] = {
    t.path: t
    for t in (
        Transport("host", "nothing", lambda a, b: True, _open_host, priority=0),
        Transport(
            "cuda_ipc",
            "two processes on the same GPU",
            lambda a, b: same_gpu(a, b) and not same_process(a, b),
            _open_cuda_ipc,
            priority=2,
        ),
        Transport("nccl", "NCCL on two different GPUs", nccl_between, _open_nccl_group, priority=1),
        Transport(
            "nccl_ctypes",
            "NCCL on two different GPUs",
            nccl_between,
            _open_nccl_ctypes,
            priority=None,
        ),
    )
}

PATHS = ("auto", *TRANSPORTS)
"""What a side may ask for."""


def endpoint_for(device: torch.device | str, request: str = "auto") -> Endpoint:
    """This process's endpoint, asking for `request` (one of PATHS)."""
    if request not in PATHS:
        raise ValueError(f"transfer path must be one of {PATHS}, got {request!r}")
    return describe_endpoint(device, request)


def choose_path(a: Endpoint, b: Endpoint) -> str:
    """The path both sides take (a key of TRANSPORTS); symmetric in a and b."""
    if a.request != b.request and "auto" not in (a.request, b.request):
        raise TransferError(
            f"the two sides ask for different transfer paths: {a.request!r} and {b.request!r}"
        )
    asked = a.request if a.request != "auto" else b.request
    if asked != "auto":
        transport = TRANSPORTS[asked]
        if not transport.possible(a, b):
            raise TransferError(f"transfer path {asked!r} needs {transport.needs}")
        return asked
    if same_process(a, b):
        return "host"
    auto = [t for t in TRANSPORTS.values() if t.priority is not None and t.possible(a, b)]
    return max(auto, key=lambda t: t.priority).path


def open_transport(path: str, setup: PairSetup) -> Channel:
    """The chosen transport, built on the pair's control channel."""
    if path not in TRANSPORTS:
        raise TransferError(f"unknown transfer path {path!r}")
    return TRANSPORTS[path].open(setup)
