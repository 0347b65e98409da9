"""The NCCL environment every zipserve process runs NCCL with: the one place that sets it.

NVLink multicast (NVLS) stays off wherever zipserve creates a communicator (bench/gpu_runbook.sh
turns it off for its shell too). NCCL reads its variables when a communicator is created, so
whoever creates one calls `apply_nccl_defaults()` first (transfer/group_builder.py for torch's
process groups, transfer/nccl.py for the ctypes binding); a launcher that starts processes
elsewhere hands `nccl_env()` to them (deploy/serve.py: Ray's runtime_env). A value already in
the environment wins.
"""

from __future__ import annotations

import os

NCCL_DEFAULTS: dict[str, str] = {"NCCL_NVLS_ENABLE": "0"}


def nccl_env() -> dict[str, str]:
    """The variables, for a child process's environment (a copy)."""
    return dict(NCCL_DEFAULTS)


def apply_nccl_defaults() -> None:
    """Set every default this process's environment does not set already."""
    for key, value in NCCL_DEFAULTS.items():
        os.environ.setdefault(key, value)
