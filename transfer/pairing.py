"""Connects one prefill/decode pair: a private two-rank gloo process group checked for
compatibility (model, codec, page size) at connect time, then the KV path the two endpoints
support, opened from the transport table (transfer/transports.py): host bytes over that gloo
group, CUDA IPC with gloo as the control path (same GPU), or a second, NCCL, group (different
GPUs; or, when asked for, a communicator of our ctypes binding); behind an optional link
emulator. Rank 0 sends the KV, rank 1 receives it."""

from __future__ import annotations

import os

from zipserve.transfer.channel import Channel
from zipserve.transfer.link import LinkEmulator
from zipserve.transfer.ports import hold_free_port, release_port
from zipserve.transfer.process_group import ProcessGroupChannel
from zipserve.transfer.select import Endpoint
from zipserve.transfer.transports import PairSetup, choose_path, endpoint_for, open_transport

COMPAT_KEYS = ("model", "codec", "page_size", "num_layers")

DEFAULT_PATH = "auto"
"""Workers pair over the best path both sides can take (transfer/transports.py): host bytes when
either is on the CPU, CUDA IPC on one GPU, NCCL across GPUs; ZIPSERVE_KV_PATH=host forces host
bytes. The one-GPU device path passed its GPU tests and a JCT run under load on an H100
(2026-12-05); the two-GPU NCCL pair has not run on two GPUs yet (none lent)."""


def connect_pair(
    info: dict,
    host: str,
    port: int,
    rank: int,
    pair_name: str,
    link_gbps: float | None = None,
    latency_ms: float = 0.0,
    timeout_s: float = 60.0,
    path: str | None = None,
) -> Channel:
    """Rank 0 (prefill, the KV sender) serves the rendezvous store at host:port, rank 1
    (decode) dials it. Raises transfer.channel.TransferError naming the first key on which the
    two sides differ. info["device"]: the worker's engine device; path: "auto" or a forced
    transfer path (transfer/transports.py; default: $ZIPSERVE_KV_PATH, else DEFAULT_PATH).
    The chosen path is the channel's declared `path`."""
    path = path or os.environ.get("ZIPSERVE_KV_PATH", DEFAULT_PATH)
    if rank == 0:  # this side serves the store: the port it held is the store's from here on
        release_port(port)
    expect = {k: info[k] for k in COMPAT_KEYS}
    device = info.get("device", "cpu")
    mine = endpoint_for(device, path)
    control = ProcessGroupChannel.connect(
        host,
        port,
        rank,
        hello={**expect, "endpoint": mine.to_dict()},
        expect=expect,
        pair_name=pair_name,
        timeout_s=timeout_s,
    )
    try:
        chosen = choose_path(
            mine, Endpoint.from_dict(control.peer_hello.get("endpoint", {"device": "cpu"}))
        )
        channel = open_transport(
            chosen, PairSetup(control, str(device), host, port, rank, pair_name, timeout_s)
        )
    except Exception:
        control.close()
        raise
    if link_gbps or latency_ms:
        channel = LinkEmulator(channel, gbps=link_gbps, latency_ms=latency_ms)
    return channel


def local_endpoint() -> dict:
    """Where a worker can host a rendezvous: its Ray node (id and IP; "" and loopback outside
    Ray) and a port free on this host, held bound until connect_pair (rank 0) serves on it."""
    node_id, node_ip = "", "127.0.0.1"
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            node_ip = ray.util.get_node_ip_address()
    except ImportError:
        pass
    return {"node_id": node_id, "node_ip": node_ip, "port": hold_free_port()}
