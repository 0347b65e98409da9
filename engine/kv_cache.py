"""The paged KV storage of one engine: per-layer K and V page tensors, in one allocation.

Only the model's KV layers (`ModelConfig.kv_layers`: every layer, except in an LCKV model) have
pages; `layer` arguments here are KV-layer indices. Layout per layer: [num_pages, num_kv_heads,
page_size, head_dim], so one (page, head) tile is contiguous (the unit the codecs quantize and
the transfer layer sends). Page 0 is a scratch page that is never handed out: padded rows of a
CUDA-graph batch write their K/V there.
"""

from __future__ import annotations

import torch
from zipserve.engine.attention import past_prefill_attention, prefill_attention
from zipserve.engine.config import ModelConfig
from zipserve.kernels.paged_decode_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
)

SCRATCH_PAGE = 0


class KVCache:
    def __init__(self, config: ModelConfig, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_pages, self.page_size = num_pages, page_size
        # [layers, 2 (K, V), pages, KVH, P, D]
        self.storage = torch.zeros(
            config.num_kv_layers, 2, num_pages, config.num_kv_heads, page_size, config.head_dim,
            dtype=dtype, device=device)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) page tensors of one layer, each [num_pages, KVH, P, D]."""
        return self.storage[idx, 0], self.storage[idx, 1]

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch,
                  scale: float) -> torch.Tensor:
        """Store the batch's new K/V in their pages, then attend. q [T, H, D], k/v [T, KVH, D]."""
        k_cache, v_cache = self.layer(layer)  # [pages, KVH, P, D] each
        k_cache[batch.write_pages, :, batch.write_offsets] = k
        v_cache[batch.write_pages, :, batch.write_offsets] = v
        if batch.is_prefill:
            if not batch.prefill_seqs or all(m[2] == 0 for m in batch.prefill_seqs):
                return prefill_attention(q, k, v, batch.seq_lens_host, scale)
            return self._chunked_prefill(q, k_cache, v_cache, batch.prefill_seqs, scale)
        attend = paged_decode_attention if q.is_cuda else paged_decode_attention_ref
        return attend(q, k_cache, v_cache, batch.page_table, batch.seq_lens, scale,
                      num_splits=batch.num_splits)

    def attend_past(self, layer: int, q: torch.Tensor, batch, scale: float) -> torch.Tensor:
        """Decode, read only: q [B, H, D] attends to the cached KV of each sequence's positions
        before the current token (an LCKV condensed layer reading the condensed top's pages)."""
        k_cache, v_cache = self.layer(layer)
        attend = paged_decode_attention if q.is_cuda else paged_decode_attention_ref
        return attend(q, k_cache, v_cache, batch.page_table, (batch.seq_lens - 1).clamp(min=0),
                      scale, num_splits=batch.num_splits)

    def _chunked_prefill(self, q, k_cache, v_cache, prefill_seqs, scale) -> torch.Tensor:
        """Prefill where some sequence's chunk starts after position 0: it attends to its pages
        (already holding this chunk's K/V) causally. q [T, H, D] -> [T, H, D]."""
        outs, t0, p = [], 0, self.page_size
        for _slot, pages, start, n in prefill_seqs:
            ids = torch.as_tensor(pages[:(start + n + p - 1) // p], device=q.device)
            k = k_cache[ids].transpose(0, 1).flatten(1, 2)[:, :start + n]  # [KVH, start+n, D]
            v = v_cache[ids].transpose(0, 1).flatten(1, 2)[:, :start + n]
            outs.append(past_prefill_attention(q[t0:t0 + n], k, v, start, scale))
            t0 += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return config.num_kv_layers * 2 * config.num_kv_heads * page_size * config.head_dim * elem
