"""`tcp_store(...)`: a torch.distributed TCPStore whose server listens only where it is meant to.

A TCPStore server binds every interface whatever address it is given (measured with torch 2.13:
`TCPStore("127.0.0.1", port, ..., is_master=True)` listens on `*:port`). When the store address
is loopback (every worker on one machine), rank 0 therefore hands the store a socket it bound to
that address itself (`master_listen_fd`), so a loopback deployment opens nothing beyond
loopback. Other addresses (a cluster) keep torch's behaviour: peers on other nodes must reach it.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from zipserve.transfer.ports import bind_socket


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def tcp_store(
    host: str,
    port: int,
    world_size: int,
    is_master: bool,
    timeout: timedelta,
    wait_for_workers: bool = True,
) -> Any:
    if not (is_master and _is_loopback(host)):
        return dist.TCPStore(
            host, port, world_size, is_master, timeout, wait_for_workers=wait_for_workers
        )
    sock = bind_socket("::1" if ":" in host else "127.0.0.1", port)
    try:
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    fd = sock.detach()  # the store's server owns the socket from here on
    try:
        return dist.TCPStore(
            host,
            port,
            world_size,
            True,
            timeout,
            wait_for_workers=wait_for_workers,
            master_listen_fd=fd,
        )
    except Exception:
        os.close(fd)
        raise
