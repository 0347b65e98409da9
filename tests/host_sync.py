"""A dispatch mode that fails on the torch ops a CUDA graph cannot capture because the host waits
for the GPU in them (a value read back, or an output whose shape depends on values): `.item()` /
`.tolist()` / `bool(t)`, boolean-mask indexing, `nonzero`, `unique`, ... On a GPU such an op inside
`torch.cuda.graph` is "operation not permitted when stream is capturing", and the failed capture
leaves the process's CUDA RNG unusable for every later capture. Run on the CPU, the mode finds
them in CI, which has no GPU."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that read a value back to the host or size their output by the values
SYNCING = (
    "aten._local_scalar_dense",
    "aten.nonzero.",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten.bincount",
    "aten.equal",
    "aten.is_nonzero",
)
INDEXING = ("aten.index.", "aten.index_put", "aten._index_put_impl_")


class HostSyncError(AssertionError):
    pass


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ()
    )


def _refuse_read_back(self, *args, **kwargs):
    raise HostSyncError("Tensor.tolist / numpy reads values back (not capturable in a CUDA graph)")


class NoHostSync(TorchDispatchMode):
    """Raises HostSyncError naming the op for any op that would make a CUDA host wait
    (`Tensor.tolist` and `Tensor.numpy` too, which read values without dispatching an op)."""

    def __enter__(self):
        self._saved = torch.Tensor.tolist, torch.Tensor.numpy
        torch.Tensor.tolist = torch.Tensor.numpy = _refuse_read_back
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNCING) or (name.startswith(INDEXING) and _has_bool_index(args)):
            raise HostSyncError(f"{name} waits for the device (not capturable in a CUDA graph)")
        return func(*args, **(kwargs or {}))
