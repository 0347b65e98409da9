"""transfer: moving encoded KV page buffers between prefill and decode workers.

`Channel` is the interface (tagged, variable-length byte messages); `InProcessChannel` for two
workers in one process, `ProcessGroupChannel` for two processes (gloo / NCCL), `CudaIpcChannel`
for two processes on one GPU, `NcclChannel` over `nccl` (a small ctypes binding for sends on our
own streams), `LinkEmulator` to shape any channel like a slower link. `kv_messages` sends a
layer's KV in the form the channel carries best (device buffers or host bytes), `select` and
`pairing` pick and connect a pair's path.
"""

from zipserve.transfer.channel import (
           Channel,
           TransferClosed,
           TransferError,
           TransferTimeout,
)
from zipserve.transfer.inprocess import InProcessChannel
from zipserve.transfer.link import LinkEmulator

__all__ = ["Channel", "InProcessChannel", "LinkEmulator", "TransferClosed", "TransferError",
           "TransferTimeout"]
