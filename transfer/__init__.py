"""transfer: moving encoded KV page buffers between prefill and decode workers.

`Channel` is the interface (tagged, variable-length byte messages); `InProcessChannel` for two
workers in one process, `ProcessGroupChannel` for two processes (gloo / NCCL), `LinkEmulator`
to shape any channel like a slower link, and `nccl` a small ctypes binding for stream control.
"""

from zipserve.transfer.channel import Channel, TransferClosed, TransferError, TransferTimeout
from zipserve.transfer.inprocess import InProcessChannel
from zipserve.transfer.link import LinkEmulator

__all__ = ["Channel", "InProcessChannel", "LinkEmulator", "TransferClosed", "TransferError",
           "TransferTimeout"]
