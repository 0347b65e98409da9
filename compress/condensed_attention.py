"""Read-only decode attention over a compressed cache's past (LCKV condensed layers).

An LCKV condensed layer's query at position pos attends to the condensed top layer's KV of
positions 0..pos-1 only: that layer has not computed the current token's KV yet. This is the
decode path of `CompressedKVCache` with the dense tail one token shorter and nothing written:
encoded full pages, then the sinks and the open page's first `pos % P` tokens. `past_kv` gives
the same past to an LCKV prefill chunk that does not start at token 0 (page-by-page scoring).
"""

from __future__ import annotations

import torch

from zipserve.compress.device_copy import index_on
from zipserve.compress.reference_attention import _row_kv


def attend_past(cache, layer: int, q: torch.Tensor, batch, scale: float) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D] over KV layer `layer` of `cache` (a CompressedKVCache): its
    decode-step read with the tail one token shorter (the current one not written)."""
    return cache.attend_tail(layer, q, batch, scale, cache.step_index(batch), past_only=True)


def past_kv(cache, layer: int, slot: int, past_pages: list[int]):
    """K/V [N, KVH, D] (fp32) of a sequence's full pages before a prefill chunk, as decode reads
    them: the dequantized pages with their sink positions taken from the dense sinks. Token order
    is not kept (attention does not need it: RoPE is already applied)."""
    ids = index_on(past_pages, cache.open.device)
    s = cache.n_sink
    sink_k, sink_v = cache.sinks[layer, 0, slot, :, :s], cache.sinks[layer, 1, slot, :, :s]
    k, v = _row_kv(cache.codecs[layer], cache.stores[layer], ids, sink_k, sink_v)  # [KVH, N, D]
    return k.transpose(0, 1), v.transpose(0, 1)
