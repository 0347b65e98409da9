"""Which KV path a prefill/decode pair uses, decided from what each side says about itself.

Each side describes its endpoint (`describe_endpoint`: device type, GPU UUID, host, process id,
NCCL availability, requested path) in the connect handshake; `choose_path` maps the two
descriptions to one path, the same on both sides (it is symmetric):
  - "host": either side is on the CPU (or a path was forced): LayerKV bytes over gloo;
  - "cuda_ipc": both on the same physical GPU of one host, in different processes;
  - "nccl": both on CUDA but different GPUs (or hosts): a two-rank NCCL process group;
  - "nccl_ctypes" (only when asked for): the same over our ctypes binding on our own stream.
Two engines in ONE process do not pair through here: they share an InProcessChannel, which
passes device tensors as they are (transfer/inprocess.py). A forced path ("host", "cuda_ipc",
"nccl") must be asked for by both sides and be possible, else TransferError says why.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass

import torch
from zipserve.transfer.channel import TransferError

PATHS = ("auto", "host", "cuda_ipc", "nccl", "nccl_ctypes")


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
    """The path this side asks for (one of PATHS)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Endpoint:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def describe_endpoint(device: torch.device | str, request: str = "auto") -> Endpoint:
    """This process's endpoint for a worker whose engine runs on device."""
    if request not in PATHS:
        raise ValueError(f"transfer path must be one of {PATHS}, got {request!r}")
    dev = torch.device(device)
    if dev.type != "cuda":
        return Endpoint("cpu", host=socket.gethostname(), pid=os.getpid(), request=request)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
    import torch.distributed as dist

    nccl = dist.is_available() and bool(getattr(dist, "is_nccl_available", lambda: False)())
    return Endpoint("cuda", uuid, socket.gethostname(), os.getpid(), nccl, request)


def choose_path(a: Endpoint, b: Endpoint) -> str:
    """The path both sides take (one of PATHS but "auto"); symmetric in a and b."""
    if a.request != b.request and "auto" not in (a.request, b.request):
        raise TransferError(f"the two sides ask for different transfer paths: {a.request!r} "
                            f"and {b.request!r}")
    forced = a.request if a.request != "auto" else b.request
    both_cuda = a.device == b.device == "cuda"
    same_gpu = both_cuda and a.host == b.host and bool(a.gpu_uuid) and a.gpu_uuid == b.gpu_uuid
    same_process = a.host == b.host and a.pid == b.pid
    if forced == "host":
        return "host"
    if forced == "cuda_ipc":
        if not same_gpu or same_process:
            raise TransferError("transfer path 'cuda_ipc' needs two processes on the same GPU")
        return "cuda_ipc"
    if forced in ("nccl", "nccl_ctypes"):
        if not (both_cuda and a.nccl and b.nccl) or same_gpu:
            raise TransferError(f"transfer path {forced!r} needs NCCL on two different GPUs")
        return forced
    if not both_cuda or same_process:
        return "host"
    if same_gpu:
        return "cuda_ipc"
    return "nccl" if a.nccl and b.nccl else "host"
