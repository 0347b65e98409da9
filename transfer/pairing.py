"""Connects one prefill/decode pair: a private two-rank process group (gloo on CPU, NCCL when
both sides hold GPUs) checked for compatibility (model, codec, page size) at connect time, behind
an optional link emulator."""

from __future__ import annotations

import socket

from zipserve.transfer.channel import Channel
from zipserve.transfer.link import LinkEmulator
from zipserve.transfer.process_group import ProcessGroupChannel

COMPAT_KEYS = ("model", "codec", "page_size", "num_layers")


def connect_pair(info: dict, host: str, port: int, rank: int, pair_name: str,
                 link_gbps: float | None = None, latency_ms: float = 0.0,
                 timeout_s: float = 60.0) -> Channel:
    """Rank 0 (prefill) serves the rendezvous store at host:port, rank 1 (decode) dials it.
    Raises transfer.channel.TransferError naming the first key on which the two sides differ."""
    hello = {k: info[k] for k in COMPAT_KEYS}
    channel: Channel = ProcessGroupChannel.connect(host, port, rank, hello=hello, expect=hello,
                                                   pair_name=pair_name, timeout_s=timeout_s)
    if link_gbps:
        channel = LinkEmulator(channel, gbps=link_gbps, latency_ms=latency_ms)
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
