"""The paged KV storage of one engine: per-layer K and V page tensors, in one allocation.

The pages of a dense-pages codec (bf16, compress/dense_codec.py): the model's K/V as they are,
attended by the paged bf16 kernel. One of the three `PagedKVCache`s (engine/paged_cache.py).
Only the model's KV layers (`ModelConfig.kv_layers`: every layer, except in an LCKV model) have
pages; `layer` arguments here are KV-layer indices. Layout per layer: [num_pages, num_kv_heads,
page_size, head_dim], so one (page, head) tile is contiguous (the unit the codecs quantize and
the transfer layer sends). Page 0 is a scratch page that is never handed out: padded rows of a
CUDA-graph batch write their K/V there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zipserve.compress.codec import KVCodec
from zipserve.compress.dense_codec import DenseCodec
from zipserve.compress.device_copy import index_on
from zipserve.compress.wire import WirePages, adopt_pages
from zipserve.engine.attention import past_prefill_attention, prefill_attention
from zipserve.engine.config import ModelConfig
from zipserve.engine.paged_cache import LayerPages
from zipserve.kernels.paged_decode_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_splits,
)

if TYPE_CHECKING:
    from zipserve.engine.sequence import Sequence

SCRATCH_PAGE = 0


class KVCache:
    scratch_slot = 0
    """No open-page slots here: padding rows write to the scratch page only."""
    graph_safe = True
    scores_by_page = False
    """The pages are exact: a sequence is scored in one pass."""

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        codec: KVCodec | None = None,
    ):
        """codec: whose values the pages hold; default the dense codec (bf16) of this model."""
        self.num_pages, self.page_size = num_pages, page_size
        self.codec = codec or DenseCodec(config.num_kv_heads, page_size, config.head_dim, dtype)
        # [layers, 2 (K, V), pages, KVH, P, D]
        self.storage = torch.zeros(
            config.num_kv_layers,
            2,
            num_pages,
            config.num_kv_heads,
            page_size,
            config.head_dim,
            dtype=dtype,
            device=device,
        )

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) page tensors of one layer, each [num_pages, KVH, P, D]."""
        return self.storage[idx, 0], self.storage[idx, 1]

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, scale: float
    ) -> torch.Tensor:
        """Store the batch's new K/V in their pages, then attend. q [T, H, D], k/v [T, KVH, D]."""
        k_cache, v_cache = self.layer(layer)  # [pages, KVH, P, D] each
        k_cache[batch.write_pages, :, batch.write_offsets] = k
        v_cache[batch.write_pages, :, batch.write_offsets] = v
        if batch.is_prefill:
            if not batch.prefill_seqs or all(m[2] == 0 for m in batch.prefill_seqs):
                return prefill_attention(q, k, v, batch.seq_lens_host, scale)
            return self._chunked_prefill(q, k_cache, v_cache, batch.prefill_seqs, scale)
        attend = paged_decode_attention if q.is_cuda else paged_decode_attention_ref
        return attend(
            q,
            k_cache,
            v_cache,
            batch.page_table,
            batch.seq_lens,
            scale,
            num_splits=batch.num_splits,
        )

    def decode_splits(self, batch: int, max_len: int, num_sms: int) -> int:
        """The paged bf16 kernel's (whatever codec's values the pages hold)."""
        return paged_decode_splits(batch, self.storage.shape[3], num_sms)

    def attend_past(self, layer: int, q: torch.Tensor, batch, scale: float) -> torch.Tensor:
        """Decode, read only: q [B, H, D] attends to the cached KV of each sequence's positions
        before the current token (an LCKV condensed layer reading the condensed top's pages)."""
        k_cache, v_cache = self.layer(layer)
        attend = paged_decode_attention if q.is_cuda else paged_decode_attention_ref
        return attend(
            q,
            k_cache,
            v_cache,
            batch.page_table,
            (batch.seq_lens - 1).clamp(min=0),
            scale,
            num_splits=batch.num_splits,
        )

    def past_kv(self, layer: int, slot: int, past_pages: list[int]):
        """K/V [N, KVH, D] of a sequence's full pages before a prefill chunk (LCKV page-by-page
        scoring; CompressedKVCache.past_kv's contract): here they are the pages themselves."""
        k_pages, v_pages = self.layer(layer)  # [pages, KVH, P, D]
        ids = index_on(past_pages, k_pages.device)
        kvh, d = k_pages.shape[1], k_pages.shape[3]
        return (
            k_pages[ids].transpose(1, 2).reshape(-1, kvh, d),
            v_pages[ids].transpose(1, 2).reshape(-1, kvh, d),
        )

    def prefix_state(self, slot: int) -> None:
        """Nothing outside the pages: a codec's 16-bit sinks (dense mode) live in page 0."""
        return None

    def restore_prefix_state(self, slot: int, state: object) -> None:
        raise RuntimeError(f"{type(self).__name__} keeps no prefix state outside its pages")

    def export_pages(self, layer: int, seq: Sequence, num_tokens: int) -> LayerPages:
        """The full pages of the first num_tokens tokens, and the valid tokens of a partly filled
        last page as open_k/open_v [KVH, r, D] (none when num_tokens is whole pages): a 10-token
        prompt sends 10 tokens, not 64."""
        k, v = self.layer(layer)  # [pages, KVH, P, D]
        n_full, r = divmod(num_tokens, self.page_size)
        tail = {}
        if r:
            page = seq.pages[n_full]
            tail = {"open_k": k[page, :, :r], "open_v": v[page, :, :r]}
        return LayerPages(
            self.codec.name,
            {"k": k, "v": v},
            torch.tensor(seq.pages[:n_full], dtype=torch.long),
            tail,
        )

    def import_pages(
        self, layer: int, pages: WirePages, tail: dict[str, torch.Tensor], seq: Sequence
    ) -> None:
        """A received layer: exactly the prompt's full pages, and the tokens of its partly filled
        page (when it has one) as open_k/open_v [KVH, r, D]."""
        k, v = self.layer(layer)
        n_full, p = pages.num_pages, self.page_size
        ids = torch.tensor(seq.pages[:n_full], dtype=torch.long)
        if len(ids) != n_full:
            raise ValueError(f"layer {layer}: {n_full} pages arrived for {len(seq.pages)} reserved")
        adopt_pages(self.codec.name, {"k": k, "v": v}, ids, pages)
        r = seq.num_tokens - n_full * p  # tokens of the partly filled page
        if not 0 <= r < p:
            raise ValueError(
                f"layer {layer}: {n_full} full pages arrived for a prompt of "
                f"{seq.num_tokens} tokens"
            )
        if not r:
            return
        if "open_k" not in tail or "open_v" not in tail:
            raise ValueError(f"layer {layer}: the 16-bit tail is missing")
        check_open_tail(layer, n_full, r, tail["open_k"].shape[1], tail["open_v"].shape[1], seq)
        k[seq.pages[n_full], :, :r] = tail["open_k"].to(k.device)
        v[seq.pages[n_full], :, :r] = tail["open_v"].to(v.device)

    def _chunked_prefill(self, q, k_cache, v_cache, prefill_seqs, scale) -> torch.Tensor:
        """Prefill where some sequence's chunk starts after position 0: it attends to its pages
        (already holding this chunk's K/V) causally. q [T, H, D] -> [T, H, D]."""
        outs, t0, p = [], 0, self.page_size
        for _slot, pages, start, n in prefill_seqs:
            ids = index_on(pages[: (start + n + p - 1) // p], q.device)
            k = k_cache[ids].transpose(0, 1).flatten(1, 2)[:, : start + n]  # [KVH, start+n, D]
            v = v_cache[ids].transpose(0, 1).flatten(1, 2)[:, : start + n]
            outs.append(past_prefill_attention(q[t0 : t0 + n], k, v, start, scale))
            t0 += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return config.num_kv_layers * 2 * config.num_kv_heads * page_size * config.head_dim * elem


def check_open_tail(layer: int, n_full: int, r: int, r_k: int, r_v: int, seq: Sequence) -> None:
    """ValueError unless a received tail of r_k / r_v tokens is the r tokens of the prompt's
    partly filled page and seq reserved a page for them after its n_full full ones."""
    if r_k != r or r_v != r:
        raise ValueError(
            f"layer {layer}: {r_k} tail tokens arrived, the prompt's last page holds {r}"
        )
    if len(seq.pages) <= n_full:
        raise ValueError(
            f"layer {layer}: {n_full} pages and {r} more tokens arrived for "
            f"{len(seq.pages)} reserved pages"
        )
