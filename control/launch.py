"""How one codec's prefill and decode workers become Ray actors: the device they run on, the share
of a GPU and the custom resource each asks Ray for, and each role's engine options
(control/placement.py adjusts them where workers share a GPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from zipserve.control.config import ServeConfig
from zipserve.control.placement import gpu_share, role_engine_options
from zipserve.decode_worker.worker import DecodeWorker
from zipserve.prefill_worker.worker import PrefillWorker

PREFILL_CONCURRENCY = 4
"""Prefill runs one prompt at a time (a lock inside); the extra concurrency lets stats and
health checks answer while it runs."""
DECODE_CONCURRENCY = 64


@dataclass(frozen=True)
class Launch:
    """The actor classes and constructor arguments of one codec's workers."""

    device: str
    """"cuda" or "cpu" (what the deployment asked for, else GPU when Ray has one)."""
    prefill_cls: Any
    decode_cls: Any
    prefill_args: dict
    decode_args: dict
    prefill_first: bool
    """Start the decode workers only once the prefill workers are up (they share GPUs)."""


def plan_launch(
    cfg: ServeConfig,
    max_model_len: int,
    *,
    cluster_workers: int | None = None,
    cluster_decode: int | None = None,
) -> Launch:
    """cluster_workers / cluster_decode: all worker / decode actors that share the cluster's
    GPUs (several codecs; default: this config's own)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = cfg.device or ("cuda" if gpus else "cpu")
    workers = cluster_workers or cfg.num_prefill + cfg.num_decode
    share = gpu_share(gpus, workers, pinned=bool(cfg.prefill_resource or cfg.decode_resource))
    opts = {"num_gpus": share} if device.startswith("cuda") else {"num_cpus": 0}
    opts.update(max_restarts=cfg.max_restarts, max_task_retries=0)
    prefill_opts, decode_opts = dict(opts), dict(opts)
    if cfg.prefill_resource:
        prefill_opts["resources"] = {cfg.prefill_resource: 1}
    if cfg.decode_resource:
        decode_opts["resources"] = {cfg.decode_resource: 1}
    args = {
        role: dict(
            model=cfg.model,
            codec=cfg.codec,
            device=device,
            engine_options=role_engine_options(
                cfg.engine_options,
                role,
                device=device,
                share=share,
                gpus=gpus,
                num_decode=cluster_decode or cfg.num_decode,
                max_model_len=max_model_len,
            ),
        )
        for role in ("prefill", "decode")
    }
    args["decode"]["engine_options"]["decode_kv"] = cfg.decode_kv_modes[cfg.codec]
    return Launch(
        device,
        ray.remote(max_concurrency=PREFILL_CONCURRENCY, **prefill_opts)(PrefillWorker),
        ray.remote(max_concurrency=DECODE_CONCURRENCY, **decode_opts)(DecodeWorker),
        args["prefill"],
        args["decode"],
        prefill_first=device.startswith("cuda") and share < 1.0,
    )
