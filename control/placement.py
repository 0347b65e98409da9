"""How much of a GPU each worker asks Ray for, and what its engine plans on when workers share.

Prefill and decode engines size their KV pools from the GPU's memory by default (85% of it, capped
by what is free). Two engines on one GPU would race for it: the first to start takes nearly all,
the second gets what is left or fails. A prefill engine holds one prompt's KV at a time and never
decodes, so when workers share GPUs it gets a pool of exactly one longest prompt and no CUDA graphs,
starts first (WorkerPool staggers the start), and the decode engines divide the rest. Whatever the
user set (num_pages, gpu_memory_fraction, cuda_graphs) is kept as it is.
"""

from __future__ import annotations

import math
from typing import Literal

from zipserve.engine.page_pool import pages_for

DEFAULT_GPU_FRACTION = 0.85
"""EngineConfig.gpu_memory_fraction's default: what one engine alone on a GPU plans on."""


def gpu_share(gpus: int, workers: int, pinned: bool) -> float:
    """GPUs per actor: a whole one when there are enough (or actors are pinned to GPU nodes by
    custom resources, which an autoscaler may still be adding), else a fair share."""
    if gpus <= 0 or pinned or gpus >= workers:
        return 1.0
    return gpus / workers


def role_engine_options(
    options: dict,
    role: Literal["prefill", "decode"],
    *,
    device: str,
    share: float,
    gpus: int,
    num_decode: int,
    max_model_len: int,
) -> dict:
    """The engine options of one worker of `role` (a copy of `options`, adjusted only on a GPU
    that several workers share, and only where the user set nothing)."""
    out = dict(options)
    if not device.startswith("cuda"):
        return out
    if role == "prefill":
        out.setdefault("cuda_graphs", False)  # a prefill engine never runs a decode step
    if share >= 1.0 or "num_pages" in options or "gpu_memory_fraction" in options:
        return out
    if role == "prefill":  # one longest prompt, plus the scratch page
        out["num_pages"] = pages_for(max_model_len, options.get("page_size", 64)) + 1
    else:
        per_gpu = math.ceil(num_decode / max(gpus, 1))
        out["gpu_memory_fraction"] = round(max(0.05, DEFAULT_GPU_FRACTION / per_gpu), 4)
    return out
