"""transfer/pairing.py: the port a worker offers for its KV channel's rendezvous stays bound until
the channel's store takes it (no other process can take it meanwhile), and a pair still connects
over it; the ports held for endpoints that are never used are capped."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from zipserve.transfer import pairing, ports

INFO = {"model": "m", "codec": "bf16", "page_size": 64, "num_layers": 2, "device": "cpu"}


def _bind(port: int, reuse: bool = False) -> None:
    with socket.socket() as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_endpoint_port_is_held_until_rank0_connects_over_it():
    port = pairing.local_endpoint()["port"]
    for reuse in (False, True):  # nobody else can take it while it is held, SO_REUSEADDR or not
        with pytest.raises(OSError):
            _bind(port, reuse)
    channels: dict[int, object] = {}
    errors: list[BaseException] = []

    def side(rank: int) -> None:
        try:
            channels[rank] = pairing.connect_pair(
                INFO, "127.0.0.1", port, rank, "held-port-test", timeout_s=30, path="host"
            )
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=side, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    try:
        payload = torch.arange(16, dtype=torch.uint8)
        channels[0].send(payload, 7)
        assert torch.equal(channels[1].recv(7, timeout=30).cpu(), payload)
    finally:
        for ch in channels.values():
            ch.close()
    assert port not in ports.held_ports()


def test_unused_endpoint_ports_are_capped_and_released():
    offered = [pairing.local_endpoint()["port"] for _ in range(ports.MAX_HELD + 3)]
    held = ports.held_ports()
    assert len(held) <= ports.MAX_HELD and held <= set(offered)
    for p in set(offered) - held:  # the oldest were closed: free again
        _bind(p)
    for p in held:
        ports.release_port(p)
    assert not ports.held_ports() & held
