"""Shared test set-up: Triton kernels run in the interpreter when there is no GPU; GPU tests skip
without one; `local_ray` is the embedded Ray the serving tests start."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "multi_gpu" in item.keywords and torch.cuda.device_count() < 2:
            item.add_marker(skip_multi)


@pytest.fixture(scope="module")
def local_ray():
    """An embedded Ray for one test module, on loopback only (as `zipserve serve` starts it),
    shut down after it. Starts clean even if an earlier module left a Ray behind (so the modules
    do not depend on their order)."""
    ray = pytest.importorskip("ray")
    from zipserve.deploy.local_ray import start_loopback_ray

    if ray.is_initialized():
        ray.shutdown()
    start_loopback_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
