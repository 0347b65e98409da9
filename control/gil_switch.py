"""The GIL's switch interval of a worker process (`apply_worker_switch_interval`).

A worker's threads hand work to each other: the forward pass queues layers for the KV sender
thread, the receive thread hands layers to the decode step loop, Ray's threads deliver calls.
A thread that wakes (a sleep ends, a socket or CUDA wait returns) needs the GIL back, and
CPython hands it over only when the holder blocks or its switch interval runs out: 5 ms by
default. A prefill's forward pass is Python launching kernels, so every wake of the sender
thread could cost up to 5 ms, several times per layer. Measured on the CPU (session 13,
`python3 -m zipserve.bench.gil_handoff`): while the sender itself slept through each emulated
slot, a 10 Gb/s send of 2 MB beside a thread running Python took 12.2 ms more than its wire time
at 5 ms, 1.6 ms at 0.5 ms; since the link's courier hands messages over (transfer/link.py),
0.2 ms and 0.01 ms.

ZIPSERVE_GIL_SWITCH_MS sets it in workers (milliseconds, > 0); unset or `python`, they keep
CPython's own. Not the default yet: on the CPU the serving path's forward passes run in torch
ops that release the GIL, and a bf16 sweep over an emulated link was the same either way (session
13); on a GPU the forward pass is Python launching kernels, and runbook stage `import16` compares
the two. The embedded Ray passes ZIPSERVE_* variables to its workers.
"""

from __future__ import annotations

import os
import sys

ENV = "ZIPSERVE_GIL_SWITCH_MS"


def worker_switch_interval_s(value: str | None = None) -> float | None:
    """The interval (seconds) workers set: from `value` (default: the environment variable);
    None when unset or `python` (CPython's own stays). ValueError naming the variable for
    anything but a positive number of milliseconds."""
    raw = (os.environ.get(ENV, "") if value is None else value).strip()
    if not raw or raw.lower() == "python":
        return None
    try:
        ms = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}: expected milliseconds or 'python', got {raw!r}") from None
    if not ms > 0 or ms == float("inf"):
        raise ValueError(f"{ENV}: must be a positive number of milliseconds, got {raw!r}")
    return ms / 1e3


def apply_worker_switch_interval() -> float:
    """Set this process's switch interval for a worker; returns the interval now in force."""
    interval = worker_switch_interval_s()
    if interval is not None:
        sys.setswitchinterval(interval)
    return sys.getswitchinterval()


def gil_switch_setting() -> str:
    """What workers started from this environment use, in words (for a run's metadata)."""
    interval = worker_switch_interval_s()
    return "python" if interval is None else f"{interval * 1e3:g}"
