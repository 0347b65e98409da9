"""What a whole group hands back for one prompt: the N rank results merged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zipserve.compress.wire import LayerKV, SliceKV
from zipserve.prefill_group.exchange import ExchangeRecord
from zipserve.prefill_group.rank import RankResult
from zipserve.prefill_group.slices import assemble_layer


@dataclass
class GroupResult:
    logits: torch.Tensor
    """[1, V] fp32 logits of the prompt's last token."""
    slices: list[list[SliceKV]]
    """[rank][layer]: what each rank sends to the decode side."""
    records: list[list[ExchangeRecord]]
    """[rank]: every all-to-all this rank took part in."""
    seconds: float
    """Slowest rank's forward time."""
    kv_bytes: int
    """Encoded KV bytes all ranks produced for the decode side."""
    dense_bytes: int
    """What that KV takes uncompressed in the model's dtype."""
    ranks: list[RankResult]

    def layers(self, request_id: str = "") -> list[LayerKV]:
        """The decode side's view: each layer's N slices assembled into one LayerKV."""
        if not self.slices[0]:
            raise ValueError("layers: the slices went to a sink during the prefill")
        return [
            assemble_layer([r[i] for r in self.slices], request_id)
            for i in range(len(self.slices[0]))
        ]

    def token_logits(self) -> torch.Tensor:
        """[T, V] logits of every prompt token (runs with all_logits only)."""
        if any(r.logits is None for r in self.ranks):
            raise ValueError("token_logits: the group ran without all_logits")
        return torch.cat([r.logits for r in self.ranks])

    def sent_bytes(self, name: str | None = None) -> int:
        """Bytes moved between ranks by all all-to-alls (every rank's sends summed)."""
        return sum(
            r.sent_bytes for recs in self.records for r in recs if name is None or r.name == name
        )


def merge(results: list[RankResult]) -> GroupResult:
    results = sorted(results, key=lambda r: r.rank)
    last = results[-1]
    if last.logits is None:
        raise RuntimeError("prefill group: the last rank returned no logits")
    return GroupResult(
        last.logits[-1:],
        [r.slices for r in results],
        [r.records for r in results],
        max(r.seconds for r in results),
        sum(r.kv_bytes for r in results),
        sum(r.dense_bytes for r in results),
        results,
    )
