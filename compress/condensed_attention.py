"""Read-only decode attention over a compressed cache's past (LCKV condensed layers).

An LCKV condensed layer's query at position pos attends to the condensed top layer's KV of
positions 0..pos-1 only: that layer has not computed the current token's KV yet. This is the
decode path of `CompressedKVCache` with the dense tail one token shorter and nothing written:
encoded full pages, then the sinks and the open page's first `pos % P` tokens. `past_kv` gives
the same past to an LCKV prefill chunk that does not start at token 0 (page-by-page scoring).
"""

from __future__ import annotations

import torch

from zipserve.compress.reference_attention import _row_kv


def attend_past(cache, layer: int, q: torch.Tensor, batch, scale: float) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D] over KV layer `layer` of `cache` (a CompressedKVCache)."""
    p, s = cache.page_size, cache.n_sink
    open_k, open_v = cache.open[layer]  # [slots, KVH, P, D]
    slots, n_full = batch.slots, batch.n_full
    off = batch.positions % p  # tokens of the open page before this one
    o_k, o_v = open_k[slots], open_v[slots]  # [B, KVH, P, D]
    if s:
        sink_k, sink_v = cache.sinks[layer]
        # As in CompressedKVCache._decode: on the first page the sinks are the open page's own
        # first tokens, so the open page is shifted to follow them.
        first_page = (n_full == 0)[:, None, None, None]
        dense_k = torch.cat([sink_k[slots], torch.where(first_page, _shift(o_k, s), o_k)], 2)
        dense_v = torch.cat([sink_v[slots], torch.where(first_page, _shift(o_v, s), o_v)], 2)
        dense_lens = torch.where(n_full == 0, off, off + s).to(torch.int32)
    else:
        dense_k, dense_v, dense_lens = o_k, o_v, off.to(torch.int32)
    return cache.codecs[layer].decode_attention(
        q,
        cache.stores[layer],
        batch.page_table,
        n_full,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        batch.num_splits,
    )


def _shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """Drop the first s tokens of an open page [B, KVH, P, D], pad at the end."""
    return torch.cat([x[:, :, s:], torch.zeros_like(x[:, :, :s])], 2)


def past_kv(cache, layer: int, slot: int, past_pages: list[int]):
    """K/V [N, KVH, D] (fp32) of a sequence's full pages before a prefill chunk, as decode reads
    them: the dequantized pages with their sink positions taken from the dense sinks. Token order
    is not kept (attention does not need it: RoPE is already applied)."""
    ids = torch.tensor(past_pages, dtype=torch.long, device=cache.open.device)
    s = cache.n_sink
    sink_k, sink_v = cache.sinks[layer, 0, slot, :, :s], cache.sinks[layer, 1, slot, :, :s]
    k, v = _row_kv(cache.codecs[layer], cache.stores[layer], ids, sink_k, sink_v)  # [KVH, N, D]
    return k.transpose(0, 1), v.transpose(0, 1)
