"""Ports a worker offers for a rendezvous store, held bound until the store takes them.

A port probed free and closed at once can be taken by another process before the store that was
meant to use it binds it (Ray starts processes meanwhile; a CI run failed that way on the HTTP
port). `hold_free_port()` keeps the port bound in this process (no SO_REUSEADDR, never listened
on: no other socket can bind it, the kernel hands it to no bind(0), and it is free the moment it
is closed); the side that serves the store calls `release_port(port)` just before binding it.
At most MAX_HELD ports are held per process: the oldest is let go first (an offered endpoint
that was never used). Also here: `bind_socket` (what the HTTP server and a loopback store bind
before listening) and `free_port` (a probe, for ranks in other processes that nothing can hold
a port for).
"""

from __future__ import annotations

import socket
import threading

MAX_HELD = 4
_held: dict[int, socket.socket] = {}
_lock = threading.Lock()


def bind_socket(address: str, port: int) -> socket.socket:
    """A TCP socket (IPv6 when address has a ':') with SO_REUSEADDR, bound to (address, port);
    closed again if the bind fails (OSError)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host right now, not held: another process may take it before whoever it
    is for binds it. Where the binding side is this process, hold_free_port instead."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def hold_free_port() -> int:
    """A port free on every interface of this host, bound here until release_port."""
    sock = socket.socket()
    sock.bind(("", 0))
    port = sock.getsockname()[1]
    with _lock:
        _held[port] = sock
        while len(_held) > MAX_HELD:
            _held.pop(next(iter(_held))).close()
    return port


def release_port(port: int) -> None:
    """Let a store bind `port` (a no-op for a port this process does not hold)."""
    with _lock:
        sock = _held.pop(port, None)
    if sock is not None:
        sock.close()


def held_ports() -> set[int]:
    with _lock:
        return set(_held)
