"""Host tensors to a device without making the host wait.

A pageable host-to-device copy makes the host wait for the stream: on a GPU shared by a
prefill and a decode worker each such wait costs a time slice (H100, session 13: hack2's page-id
copies made a layer's import 5.7 ms). Through pinned memory the copy is queued and the host goes
on; torch's pinned-memory cache keeps the staging buffer until the copy has run.

`index_on` is the form every page-id list takes on its way to a GPU (caches, wire): a
`torch.tensor(ids, device=cuda)` is such a pageable copy, and inside a prefill it made the host
wait for the queued layers before every compressed layer's encode (found in session 17).
"""

from __future__ import annotations

import torch


def to_device_nowait(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`; a host tensor goes to a GPU through pinned memory, without waiting."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def index_on(ids: torch.Tensor | list[int], device: torch.device | str) -> torch.Tensor:
    """Ids (a host list or tensor) as int64 on `device`, through to_device_nowait."""
    return to_device_nowait(torch.as_tensor(ids, dtype=torch.long), device)


def pinned(values) -> torch.Tensor:
    """Host values (a numpy array or a list) as a pinned CPU tensor, the source of a copy to a GPU
    that does not wait (`dst.copy_(pinned(x), non_blocking=True)`); torch keeps the block until
    the copy has run."""
    t = torch.as_tensor(values)
    return t.pin_memory() if torch.cuda.is_available() else t
