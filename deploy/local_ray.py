"""The embedded Ray of `zipserve serve` (no --address), listening on loopback only.

By default Ray takes the machine's outward address as its node IP and binds its servers to every
interface: the GCS, the raylet (node and object manager), every worker's and the driver's gRPC
port on `*`, the runtime-env agent on the node IP, the autoscaler monitor's metrics port on
0.0.0.0. `ray.init(_node_ip_address="127.0.0.1")` does not help: Ray turns a loopback address
back into the outward one (`services.resolve_ip_for_localhost`).

What does work (measured with Ray 2.60, `tests/test_hardening_ray.py` checks it): Ray's own
single-machine switch, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (`ray_constants.ENABLE_RAY_CLUSTER`,
off by default on Windows and macOS, where Ray then runs on loopback to avoid firewall prompts).
With it off while the head starts, the node IP is 127.0.0.1 and every one of those servers binds
loopback. Ray reads the variable once, when it is imported, so `start_loopback_ray` sets the
module constant for the duration of `ray.init` (and not the environment, which child processes
such as a later `ray start` would inherit). It then checks the node IP Ray ended up with and
refuses to go on (RuntimeError) if it is not loopback, so a Ray upgrade that changes this fails
loudly instead of opening ports.

A cluster deployment (`--address`) is left as Ray configures it: README "Running on a Ray
cluster" lists the ports it needs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextmanager
def _single_machine_ray() -> Iterator[None]:
    import ray._private.ray_constants as ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before


def start_loopback_ray(**init_kwargs: Any) -> str:
    """`ray.init(address="local", **init_kwargs)`: a new Ray of this process only (whatever
    RAY_ADDRESS says), every server of it bound to loopback; returns its node IP. RuntimeError
    (Ray shut down again) if Ray would not."""
    import ray

    with _single_machine_ray():
        ray.init(**{"address": "local", **init_kwargs})
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        ray.shutdown()
        raise RuntimeError(
            f"the embedded Ray came up on {node_ip}, not on loopback: this Ray "
            f"version ignores its single-machine switch; refusing to open its "
            f"ports to the network (use --address with a cluster you secure)"
        )
    return node_ip
