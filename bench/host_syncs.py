"""Where a piece of GPU work makes the host wait: torch's sync debug mode, as a context manager
that records each synchronizing call's Python source line.

A host that waits for the stream (a pageable copy to or from the GPU, `.item()`, `.tolist()`, a
`torch.tensor(list, device=cuda)`) cannot queue the next kernels meanwhile: inside a prefill the
GPU then idles for every launch after the wait (session 17: the compressed caches' page ids made
every compressed layer wait, hack2's export cost 11 ms of a 4k prefill on an H100, bf16's 0.1).
Used by bench/prefill_profile.py and the GPU tests that keep the prefill free of waits. On a CPU
nothing is recorded (nothing waits).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

MESSAGE = "called a synchronizing CUDA operation"
"""What torch's sync debug mode warns with."""

_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _where(filename: str, lineno: int) -> str:
    """A source line as `path:line`, relative to the repository when it is one of ours (links
    resolved: the package may be imported through one)."""
    path = os.path.realpath(filename)
    if path.startswith(_ROOT + os.sep):
        path = os.path.relpath(path, _ROOT)
    return f"{path}:{lineno}"


@contextmanager
def host_syncs(device: torch.device | str) -> Iterator[list[str]]:
    """Record every synchronizing CUDA call made inside the block as `path:line` (the Python line
    that made it), in the yielded list, filled when the block exits. Nothing on a CPU device."""
    found: list[str] = []
    if torch.device(device).type != "cuda":
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found.extend(_where(w.filename, w.lineno) for w in caught if MESSAGE in str(w.message))


def summary(found: list[str], top: int = 4) -> str:
    """`n waits: path:line xk, ...` (most frequent first), or `no waits`."""
    if not found:
        return "no waits"
    lines = ", ".join(f"{where} x{n}" for where, n in Counter(found).most_common(top))
    return f"{len(found)} waits: {lines}"
