"""Constant index tensors a decode step asks for every layer (row ids 0..m-1, zeros), kept per
device and handed out as views, so a CUDA-graph-captured step does not launch an arange or a fill
per layer for them.

A cache is only filled outside a CUDA graph capture: memory a capture allocates is not written
until the graph replays, so during capture a miss returns a fresh tensor and keeps nothing. The
views are read-only by contract: kernels take them as inputs only.
"""

from collections.abc import Callable

import torch

_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def kept_outside_capture(cache: dict, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """cache[key], made by make() on a miss and kept there unless a CUDA graph is capturing on
    the tensor's device (then it is returned and not kept: its memory is unwritten until the
    graph replays). The one rule every per-device constant cache of the decode step follows."""
    if key in cache:
        return cache[key]
    t = make()
    if not _capturing(t.device):
        cache[key] = t
    return t


def _cached(kind: str, m: int, device: torch.device) -> torch.Tensor:
    """int32 [m]: 0..m-1 (kind "rows") or zeros (kind "zeros") on device."""
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    device = torch.device(device)
    key = (kind, device)
    have = _CACHE.get(key)
    if have is not None and have.numel() >= m:
        return have[:m]
    n = max(m, 64 if have is None else 2 * have.numel())  # grow geometrically: few refills
    fresh = (
        torch.arange(n, dtype=torch.int32, device=device)
        if kind == "rows"
        else torch.zeros(n, dtype=torch.int32, device=device)
    )
    if not _capturing(device):
        _CACHE[key] = fresh
    return fresh[:m]


def row_ids(m: int, device) -> torch.Tensor:
    """int32 [m] = 0, 1, ..., m-1 on device (a view of a shared cache: never write to it)."""
    return _cached("rows", m, device)


def zero_ids(m: int, device) -> torch.Tensor:
    """int32 [m] of zeros on device (a view of a shared cache: never write to it)."""
    return _cached("zeros", m, device)
