"""kivi2 / kivi4: KIVI-style quantized pages (K per channel, V per token), encoded and attended by
kernels that quantize / dequantize on the fly (Triton on GPU, their torch references on CPU)."""

from __future__ import annotations

import torch

from zipserve.compress import quantize as qz
from zipserve.compress.codec import CHANNEL_GROUP, KVCodec
from zipserve.kernels import baseline_prefill_attention as base_prefill
from zipserve.kernels import dequant_pages as dq
from zipserve.kernels import kivi_decode_attention as kivi_attn
from zipserve.kernels import kivi_encode as kivi_enc
from zipserve.kernels.arg_checks import is_pow2
from zipserve.kernels.hack_layout import unpack_planar


class KiviCodec(KVCodec):
    """KIVI-style: K per channel over groups of 32 tokens, V per token in groups of 32 channels;
    the open page is KIVI's 16-bit residual window; attention dequantizes. clip: the range clip of
    each group (compress/quantize.py; 0, the default: KIVI's min/max; the shipped kivi2/kivi4 use
    0, bench/kivi_equal_bytes.py measures KIVI with HACK's clip too)."""

    token_group = channel_group = CHANNEL_GROUP
    head_dim_multiple = CHANNEL_GROUP

    def __init__(self, num_kv_heads, page_size, head_dim, bits: int, clip: float = 0.0):
        self.bits, self.name = bits, f"kivi{bits}"
        self.clip = qz.check_clip(clip)
        super().__init__(num_kv_heads, page_size, head_dim)
        if page_size % self.token_group:
            raise ValueError(
                f"page_size: codec {self.name} needs a multiple of "
                f"{self.token_group} (got {page_size})"
            )

    def new_store(self, num_pages, device):
        shapes = kivi_enc.store_shapes(
            num_pages,
            self.kvh,
            self.page_size,
            self.head_dim,
            self.bits,
            self.token_group,
            self.channel_group,
        )
        return {
            name: torch.zeros(shape, dtype=dtype, device=device)
            for name, (shape, dtype) in shapes.items()
        }

    def encode(self, store, page_ids, k, v, **where):
        """Pages k, v [n, KVH, P, D] into page_ids; where: seal_rows' src_rows / skip_page."""
        # Capability choice, not a fallback: the Triton encoder's tiles need a CUDA tensor and
        # power-of-two page_size / head_dim; anything else (CPU, head_dim 96, 160...) takes its
        # torch reference, which stores the same pages.
        _, _, p, d = k.shape
        fast = k.is_cuda and is_pow2(p) and is_pow2(d)
        fn = kivi_enc.kivi_encode_pages if fast else kivi_enc.kivi_encode_pages_ref
        fn(
            k,
            v,
            self.bits,
            store,
            page_ids,
            self.clip,
            self.token_group,
            self.channel_group,
            **where,
        )

    def seal_rows(self, store, page_ids, k, v, rows, skip_page):
        """In place: rows `rows` of the open pages, programs sealing into skip_page write nothing
        (the grid is the batch: CUDA-graph safe; a step that fills no page quantizes nothing)."""
        self.encode(store, page_ids, k, v, src_rows=rows, skip_page=skip_page)

    def dequantize(self, store, page_ids):
        k = qz.dequant_k(
            unpack_planar(store["k_codes"][page_ids], self.bits),
            store["k_scale"][page_ids],
            store["k_min"][page_ids],
        )
        v = qz.dequant_v(
            unpack_planar(store["v_codes"][page_ids], self.bits),
            store["v_scale"][page_ids],
            store["v_min"][page_ids],
        )
        return k, v

    def dequantize_into(self, pages, page_ids, out_k, out_v):
        fn = dq.kivi_dequant_pages if out_k.is_cuda else dq.kivi_dequant_pages_ref
        fn(
            pages["k_codes"],
            pages["k_scale"],
            pages["k_min"],
            pages["v_codes"],
            pages["v_scale"],
            pages["v_min"],
            self.bits,
            page_ids,
            out_k,
            out_v,
        )

    def decode_attention(
        self, q, store, page_table, n_full, dense_k, dense_v, dense_lens, scale, num_splits=1
    ):
        fn = kivi_attn.kivi_decode_attention if q.is_cuda else kivi_attn.kivi_decode_attention_ref
        return fn(
            q,
            store["k_codes"],
            store["k_scale"],
            store["k_min"],
            store["v_codes"],
            store["v_scale"],
            store["v_min"],
            page_table,
            n_full,
            dense_k,
            dense_v,
            dense_lens,
            scale,
            self.bits,
            num_splits=num_splits,
        )

    def prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v, scale):
        fn = (
            base_prefill.kivi_prefill_attention
            if q.is_cuda
            else base_prefill.kivi_prefill_attention_ref
        )
        dense = k.new_zeros(self.kvh, 0, self.head_dim)  # [KVH, 0, D]: no sinks, whole pages
        return fn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            store["k_codes"],
            store["k_scale"],
            store["k_min"],
            store["v_codes"],
            store["v_scale"],
            store["v_min"],
            past_pages.to(torch.int32).contiguous(),
            dense,
            dense,
            scale,
            self.bits,
        )

    def page_bytes_per_token(self):
        d = self.head_dim
        codes = 2 * d * self.bits / 8
        k_side = 2 * d * 2 / self.token_group  # scale + min per channel per 32 tokens
        v_side = 2 * (d // self.channel_group) * 2
        return codes + k_side + v_side
