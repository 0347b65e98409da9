"""bf16: the model's own K/V in dense pages, a codec like any other.

Its pages are the keys and values as the model computed them, in the model's dtype (`dtype`:
bf16 on a GPU, fp32 on the CPU by default), one [KVH, P, D] tile per page and per K/V. Because
`dense_pages` is set, an engine keeps them in its 16-bit page pool (engine/kv_cache.py) and
decodes with the paged bf16 kernel exactly as before there was a codec object for it: nothing on
the hot path calls this class. What uses it: the wire (the pool's pages travel as its store), a
prefill group's slices (encode = copy), the byte counts, and anything that treats codecs alike.

Bytes are counted at 16 bits per value (what a bf16 deployment stores and sends), as every codec
counts its 16-bit open page and sinks (`KVCodec.bytes_per_token`'s dense_bytes).
"""

from __future__ import annotations

import torch

from zipserve.compress.codec import KVCodec, Store

DENSE_BYTES = 2
"""Bytes per value counted for dense pages (bf16)."""


class DenseCodec(KVCodec):
    name = "bf16"
    dense_pages = True

    def __init__(
        self, num_kv_heads: int, page_size: int, head_dim: int, dtype: torch.dtype = torch.bfloat16
    ):
        super().__init__(num_kv_heads, page_size, head_dim)
        self.dtype = dtype

    def new_store(self, num_pages: int, device) -> Store:
        shape = (num_pages, self.kvh, self.page_size, self.head_dim)  # [pages, KVH, P, D]
        return {
            "k": torch.zeros(shape, dtype=self.dtype, device=device),
            "v": torch.zeros(shape, dtype=self.dtype, device=device),
        }

    def encode(self, store, page_ids, k, v):
        store["k"][page_ids] = k.to(self.dtype)  # [n, KVH, P, D]
        store["v"][page_ids] = v.to(self.dtype)

    def dequantize(self, store, page_ids):
        return store["k"][page_ids].float(), store["v"][page_ids].float()

    def dequantize_into(self, pages, page_ids, out_k, out_v):
        ids = page_ids.to(out_k.device)
        out_k[ids] = pages["k"].to(out_k.device, out_k.dtype)
        out_v[ids] = pages["v"].to(out_v.device, out_v.dtype)

    def page_bytes_per_token(self):
        return 2 * self.head_dim * DENSE_BYTES

    def bytes_per_token(self, num_layers, seq_len=None, dense_bytes=DENSE_BYTES):
        """Every token is dense (no open page or sinks beside the pages to amortize)."""
        return num_layers * self.kvh * 2 * self.head_dim * dense_bytes
