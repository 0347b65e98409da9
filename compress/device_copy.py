"""Host tensors to a device without making the host wait.

A pageable host-to-device copy makes the host wait for the stream: on a GPU shared by a
prefill and a decode worker each such wait costs a time slice (H100, session 13: hack2's page-id
copies made a layer's import 5.7 ms). Through pinned memory the copy is queued and the host goes
on; torch's pinned-memory cache keeps the staging buffer until the copy has run.
"""

from __future__ import annotations

import torch


def to_device_nowait(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`; a host tensor goes to a GPU through pinned memory, without waiting."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
