"""Connects one prefill/decode pair: a private two-rank gloo process group checked for
compatibility (model, codec, page size) at connect time, then the KV path the two endpoints
support (transfer/select.py): host bytes over that gloo group, CUDA IPC with gloo as the control
path (same GPU), or a second, NCCL, group (different GPUs; or, when asked for, a communicator of
our ctypes binding); behind an optional link emulator. Rank 0 sends the KV, rank 1 receives it."""

from __future__ import annotations

import os
import socket

from zipserve.transfer.channel import Channel, TransferError
from zipserve.transfer.link import LinkEmulator
from zipserve.transfer.process_group import ProcessGroupChannel
from zipserve.transfer.select import Endpoint, choose_path, describe_endpoint

COMPAT_KEYS = ("model", "codec", "page_size", "num_layers")

DEFAULT_PATH = "auto"
"""Workers pair over the best path both sides can take (transfer/select.py): host bytes when
either is on the CPU, CUDA IPC on one GPU, NCCL across GPUs; ZIPSERVE_KV_PATH=host forces host
bytes. The one-GPU device path passed its GPU tests and a JCT run under load on an H100
(2026-12-05); the two-GPU NCCL pair has not run on two GPUs yet (none lent)."""


def connect_pair(info: dict, host: str, port: int, rank: int, pair_name: str,
                 link_gbps: float | None = None, latency_ms: float = 0.0,
                 timeout_s: float = 60.0, path: str | None = None) -> Channel:
    """Rank 0 (prefill, the KV sender) serves the rendezvous store at host:port, rank 1
    (decode) dials it. Raises transfer.channel.TransferError naming the first key on which the
    two sides differ. info["device"]: the worker's engine device; path: "auto" or a forced
    transfer path (transfer/select.py; default: $ZIPSERVE_KV_PATH, else DEFAULT_PATH). The
    chosen path is in the channel's `path` attribute."""
    path = path or os.environ.get("ZIPSERVE_KV_PATH", DEFAULT_PATH)
    expect = {k: info[k] for k in COMPAT_KEYS}
    mine = describe_endpoint(info.get("device", "cpu"), path)
    control = ProcessGroupChannel.connect(host, port, rank, hello={**expect,
                                                                   "endpoint": mine.to_dict()},
                                          expect=expect, pair_name=pair_name,
                                          timeout_s=timeout_s)
    try:
        chosen = choose_path(mine, Endpoint.from_dict(control.peer_hello.get("endpoint",
                                                                            {"device": "cpu"})))
        channel = _upgrade(control, chosen, info, host, port, rank, pair_name, timeout_s)
    except Exception:
        control.close()
        raise
    channel.path = chosen
    if link_gbps or latency_ms:
        channel = LinkEmulator(channel, gbps=link_gbps, latency_ms=latency_ms)
        channel.path = chosen
    return channel


def local_endpoint() -> dict:
    """Where a worker can host a rendezvous: its Ray node (id and IP; "" and loopback outside
    Ray) and a port free on this host right now."""
    node_id, node_ip = "", "127.0.0.1"
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            node_ip = ray.util.get_node_ip_address()
    except ImportError:
        pass
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return {"node_id": node_id, "node_ip": node_ip, "port": port}


def _upgrade(control: ProcessGroupChannel, chosen: str, info: dict, host: str, port: int,
             rank: int, pair_name: str, timeout_s: float) -> Channel:
    if chosen == "host":
        return control
    import torch

    dev = torch.device(info["device"])
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if chosen == "cuda_ipc":
        from zipserve.transfer.cuda_ipc import CudaIpcChannel

        return CudaIpcChannel(control, dev, ack_timeout_s=timeout_s)
    if chosen == "nccl":  # the KV group; the gloo group's store hosts its rendezvous too
        try:
            data = ProcessGroupChannel(host, port, rank, backend="nccl", device=dev,
                                       timeout_s=timeout_s, pair_name=f"{pair_name}/nccl",
                                       store=control._tcp_store)
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(f"cannot build the NCCL group of pair {pair_name}: {e}") from e
        control.close()
        return data
    if chosen == "nccl_ctypes":  # our binding: the unique id travels through the pair's store
        from zipserve.transfer import nccl
        from zipserve.transfer.nccl_channel import NcclChannel

        try:
            if rank == 0:
                control._store.set("nccl_uid", nccl.get_unique_id())
            uid = bytes(control._store.get("nccl_uid"))
            comm = nccl.NcclComm(uid, 2, rank, dev)
        except Exception as e:
            raise TransferError(f"cannot build the NCCL communicator of pair {pair_name}: "
                                f"{e}") from e
        control.close()
        return NcclChannel(comm, 1 - rank, "send" if rank == 0 else "recv", timeout_s)
    raise TransferError(f"unknown transfer path {chosen!r}")
