"""What each side of a prefill/decode pair says about itself when it connects: its `Endpoint`.

Each side describes its endpoint (`describe_endpoint`: device type, GPU UUID, host, process id,
NCCL availability, requested path) in the connect handshake; the transport table
(transfer/transports.py) maps the two descriptions to one KV path, the same on both sides. The
relations it asks about (`same_gpu`, `same_process`, `nccl_between`) are here.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Endpoint:
    device: str
    """'cpu' or 'cuda' (type only)."""
    gpu_uuid: str = ""
    host: str = ""
    pid: int = 0
    nccl: bool = False
    """torch.distributed has NCCL on this side."""
    request: str = "auto"
    """The path this side asks for ("auto" or a key of transfer.transports.TRANSPORTS)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Endpoint:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def describe_endpoint(device: torch.device | str, request: str = "auto") -> Endpoint:
    """This process's endpoint for a worker whose engine runs on device (request: checked by
    transfer.transports.endpoint_for)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return Endpoint("cpu", host=socket.gethostname(), pid=os.getpid(), request=request)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    import torch.distributed as dist

    nccl = dist.is_available() and dist.is_nccl_available()
    return Endpoint("cuda", uuid, socket.gethostname(), os.getpid(), nccl, request)


def both_cuda(a: Endpoint, b: Endpoint) -> bool:
    return a.device == b.device == "cuda"


def same_gpu(a: Endpoint, b: Endpoint) -> bool:
    """The same physical GPU (by UUID) of one host."""
    return both_cuda(a, b) and a.host == b.host and bool(a.gpu_uuid) and a.gpu_uuid == b.gpu_uuid


def same_process(a: Endpoint, b: Endpoint) -> bool:
    return a.host == b.host and a.pid == b.pid


def nccl_between(a: Endpoint, b: Endpoint) -> bool:
    """Both sides on CUDA with NCCL, on two different GPUs (NCCL cannot pair a GPU with
    itself across processes)."""
    return both_cuda(a, b) and a.nccl and b.nccl and not same_gpu(a, b)
