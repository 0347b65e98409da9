"""How much the GIL's switch interval costs a link-emulated KV sender beside a busy thread.

One thread runs Python without blocking (like a forward pass launching kernels); another sends
buffers through a LinkEmulator over an in-process channel, as the prefill worker's sender thread
does (the emulator's courier thread hands them over). Per switch interval: the time until the
last one was handed over beyond the wire time, per send.

    python3 -m zipserve.bench.gil_handoff --intervals-ms 5,1,0.5,0.1
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch

from zipserve.transfer.inprocess import InProcessChannel
from zipserve.transfer.link import LinkEmulator


def excess_per_send_ms(interval_s: float, sends: int, nbytes: int, gbps: float) -> float:
    """Mean ms each send took beyond its wire time, with a Python-busy thread beside it."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    a, b = InProcessChannel.pair()
    link = LinkEmulator(a, gbps=gbps)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    def drain() -> None:
        for _ in range(sends):
            b.recv(1, timeout=30.0)

    threads = [threading.Thread(target=busy, daemon=True), threading.Thread(target=drain)]
    for t in threads:
        t.start()
    try:
        t0 = time.monotonic()
        for _ in range(sends):
            link.send(buf, 1)
        link.flush(timeout=60.0)  # until the last one was handed over
        took = time.monotonic() - t0
    finally:
        stop.set()
        threads[1].join(timeout=30.0)
        sys.setswitchinterval(old)
    return 1e3 * (took - sends * link.transmit_seconds(nbytes)) / sends


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals-ms", default="5,1,0.5,0.1")
    ap.add_argument("--sends", type=int, default=100)
    ap.add_argument("--mb", type=float, default=2.0, help="MB per send")
    ap.add_argument("--gbps", type=float, default=10.0)
    args = ap.parse_args(argv)
    nbytes = int(args.mb * 1e6)
    wire_ms = 1e3 * nbytes * 8 / (args.gbps * 1e9)
    print(f"{args.sends} sends of {args.mb:g} MB at {args.gbps:g} Gb/s ({wire_ms:.2f} ms each)")
    print("| switch interval ms | excess per send ms |")
    print("|---|---|")
    for ms in (float(x) for x in args.intervals_ms.split(",")):
        excess = excess_per_send_ms(ms / 1e3, args.sends, nbytes, args.gbps)
        print(f"| {ms:g} | {excess:.2f} |")


if __name__ == "__main__":
    main()
