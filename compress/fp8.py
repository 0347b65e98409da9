"""fp8: e4m3 pages with one scale per page and KV head (Triton kernels on GPU, torch references on
CPU)."""

from __future__ import annotations

import torch

from zipserve.compress.codec import KVCodec
from zipserve.kernels import baseline_prefill_attention as base_prefill
from zipserve.kernels import dequant_pages as dq
from zipserve.kernels import fp8_decode_attention as fp8_attn
from zipserve.kernels import fp8_encode
from zipserve.kernels.fp8_encode import FP8_MAX

__all__ = ["FP8_MAX", "Fp8Codec"]


class Fp8Codec(KVCodec):
    """e4m3 with one scale per page and KV head."""

    name = "fp8"

    def new_store(self, num_pages, device):
        shape = (num_pages, self.kvh, self.page_size, self.head_dim)
        return {
            "k": torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
            "v": torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
            "k_scale": torch.zeros(num_pages, self.kvh, device=device),
            "v_scale": torch.zeros(num_pages, self.kvh, device=device),
        }

    def encode(self, store, page_ids, k, v, **where):
        """Pages k, v [n, KVH, P, D] into page_ids (kernels/fp8_encode.py: one Triton launch on a
        GPU, its torch reference on the CPU); where: seal_rows' src_rows / skip_page."""
        fn = fp8_encode.fp8_encode_pages if k.is_cuda else fp8_encode.fp8_encode_pages_ref
        fn(k, v, store, page_ids, **where)

    def seal_rows(self, store, page_ids, k, v, rows, skip_page):
        """In place: rows `rows` of the open pages, programs sealing into skip_page write nothing
        (the grid is the batch: CUDA-graph safe; a step that fills no page quantizes nothing)."""
        self.encode(store, page_ids, k, v, src_rows=rows, skip_page=skip_page)

    def dequantize(self, store, page_ids):
        return tuple(
            store[n][page_ids].float() * store[n + "_scale"][page_ids][:, :, None, None]
            for n in ("k", "v")
        )

    def dequantize_into(self, pages, page_ids, out_k, out_v):
        fn = dq.fp8_dequant_pages if out_k.is_cuda else dq.fp8_dequant_pages_ref
        fn(pages["k"], pages["k_scale"], pages["v"], pages["v_scale"], page_ids, out_k, out_v)

    def decode_attention(
        self, q, store, page_table, n_full, dense_k, dense_v, dense_lens, scale, num_splits=1
    ):
        fn = fp8_attn.fp8_decode_attention if q.is_cuda else fp8_attn.fp8_decode_attention_ref
        return fn(
            q,
            store["k"],
            store["k_scale"],
            store["v"],
            store["v_scale"],
            page_table,
            n_full,
            dense_k,
            dense_v,
            dense_lens,
            scale,
            num_splits=num_splits,
        )

    def prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v, scale):
        fn = (
            base_prefill.fp8_prefill_attention
            if q.is_cuda
            else base_prefill.fp8_prefill_attention_ref
        )
        dense = k.new_zeros(self.kvh, 0, self.head_dim)  # [KVH, 0, D]: no sinks, whole pages
        return fn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            store["k"],
            store["k_scale"],
            store["v"],
            store["v_scale"],
            past_pages.to(torch.int32).contiguous(),
            dense,
            dense,
            scale,
        )

    def page_bytes_per_token(self):
        return 2 * self.head_dim + 2 * 4 / self.page_size
