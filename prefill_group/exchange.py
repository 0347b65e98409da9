"""All-to-all over a prefill group's process group, with a byte count per call.

`Exchange.all_to_all` takes one 1-D tensor made of N consecutive chunks (chunk j goes to rank j)
and returns the N chunks received (chunk i from rank i), concatenated. With N == 1 (no group) it
returns its input and counts nothing. `ByteCounter` keeps one record per call: payload bytes this
rank sent to other ranks (its own chunk never leaves) and the tokens the call covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from zipserve.prefill_group.plan import plan_heads


@dataclass(frozen=True)
class ExchangeRecord:
    name: str
    """'qkv' (token split -> head split) or 'out' (head split -> token split)."""
    layer: int
    sent_bytes: int
    """Bytes this rank sent to the other ranks in this call."""
    recv_bytes: int
    """Bytes this rank received from the other ranks."""


@dataclass
class ByteCounter:
    records: list[ExchangeRecord] = field(default_factory=list)

    def add(self, rec: ExchangeRecord) -> None:
        self.records.append(rec)

    def sent(self, name: str | None = None, layer: int | None = None) -> int:
        return sum(
            r.sent_bytes
            for r in self.records
            if (name is None or r.name == name) and (layer is None or r.layer == layer)
        )


class Exchange:
    def __init__(self, pg: Any | None, rank: int, n: int, counter: ByteCounter | None = None):
        if n > 1 and pg is None:
            raise ValueError(f"a group of {n} ranks needs a process group")
        self.pg, self.rank, self.n = pg, rank, n
        self.counter = counter if counter is not None else ByteCounter()

    def all_to_all(
        self,
        send: torch.Tensor,
        send_sizes: list[int],
        recv_sizes: list[int],
        name: str,
        layer: int,
    ) -> torch.Tensor:
        """send: [sum(send_sizes)] (chunk j for rank j) -> [sum(recv_sizes)] (chunk i from i)."""
        if self.n == 1:
            return send
        assert len(send_sizes) == len(recv_sizes) == self.n and send.dim() == 1
        recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=send.device)
        work = self.pg.alltoall_base(
            recv, send.contiguous(), list(recv_sizes), list(send_sizes), dist.AllToAllOptions()
        )
        work.wait()
        elem = send.element_size()
        self.counter.add(
            ExchangeRecord(
                name,
                layer,
                elem * (sum(send_sizes) - send_sizes[self.rank]),
                elem * (sum(recv_sizes) - recv_sizes[self.rank]),
            )
        )
        return recv


def expected_layer_bytes(
    num_heads: int, num_kv_heads: int, n: int, d_qk: int, d_v: int, elem: int, num_tokens: int
) -> dict[str, int]:
    """Bytes one layer's two all-to-alls move between ranks, whole group, for num_tokens tokens.
    'qkv': each token's row of W = (H/N)*d_qk + kvn*(d_qk + d_v) values goes to N-1 other ranks
    (kvn = kv heads per rank, replicas included); 'out': each token's (H/N)*d_v outputs come
    back from N-1 ranks."""
    sp = plan_heads(num_heads, num_kv_heads, n)
    width = sp.q_per_rank * d_qk + sp.kv_per_rank * (d_qk + d_v)
    return {
        "qkv": num_tokens * (n - 1) * width * elem,
        "out": num_tokens * (n - 1) * sp.q_per_rank * d_v * elem,
    }
