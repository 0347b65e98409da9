"""What every KV codec is: the `KVCodec` base class, its capabilities and its head-size rule.

A codec owns the layout of a *full* page of P tokens of one layer (its "store" is a dict of tensors
with the page index first), encodes full 16-bit pages into it, attends to it at decode time and
states its exact bytes. Every codec keeps the open page (the last, partly filled one) in 16-bit
until it is full, so no page is ever re-quantized; HACK also keeps the first 4 tokens (sinks).

What the engine needs to know of a codec is declared here as class attributes, never guessed from
its name: `dense_pages` (its pages are the model's K/V as they are: the engine keeps them in its
16-bit page pool and decodes with the paged bf16 kernel), `dense_form` (decode_kv=dense can hold
its values), `graph_safe`, `n_sink`, `head_dim_multiple`, `bases` (calibrated bases a prefill
group may exchange in) and the `prepare_model` hook. compress/codecs.py maps names to codecs.

Head sizes: every codec takes an even head_dim in [8, 256] that is a multiple of its
`head_dim_multiple` (KIVI and HACK: their 32-channel group). A codec built for a head_dim it
cannot take raises ValueError naming head_dim, the codec and what it needs, so an engine refuses
the model at load, never at its first request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from zipserve.compress.reference_attention import (
    compressed_past_prefill_attention,
    dequant_decode_attention,
)
from zipserve.kernels.head_dim import MAX_HEAD_DIM, MIN_HEAD_DIM, head_dim_ok
from zipserve.kernels.paged_decode_attention import choose_num_splits

Store = dict[str, torch.Tensor]
CHANNEL_GROUP = 32
"""KIVI's and HACK's channel group: their head_dim must be a multiple of it."""


def head_dim_rule(multiple: int) -> str:
    """What a codec whose head_dim must be a multiple of `multiple` needs, in words."""
    if multiple <= 2:
        return f"an even head_dim in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    return f"head_dim a multiple of {multiple} in [{multiple}, {MAX_HEAD_DIM}]"


def head_dim_fits(multiple: int, head_dim: int) -> bool:
    return head_dim_ok(head_dim) and head_dim % multiple == 0


def require_head_dim(codec: str, multiple: int, head_dim: int) -> None:
    """ValueError naming head_dim, the codec and what it needs, when head_dim does not fit."""
    if not head_dim_fits(multiple, head_dim):
        raise ValueError(
            f"head_dim: codec {codec} needs {head_dim_rule(multiple)} (got {head_dim})"
        )


class KVCodec(ABC):
    name: str
    graph_safe: bool = True
    """decode_attention launches no host syncs on CUDA (can be captured in a CUDA graph)."""
    n_sink: int = 0
    """Leading tokens of a sequence kept in 16-bit beside the pages (attended densely)."""
    head_dim_multiple: int = 2
    """head_dim must be a multiple of this (and an even number in [8, 256])."""
    dense_pages: bool = False
    """Its pages are the model's K/V as they are (bf16): the engine keeps them in its 16-bit page
    pool (engine/kv_cache.py) and decodes with the paged bf16 kernel; no compressed attention."""
    dense_form: bool = True
    """decode_kv=dense can hold its values: `dequantize_into` writes them in the model's basis."""
    no_dense_form_reason: str = "it has no dense form"
    """Why decode_kv=dense is refused when dense_form is False (the error says it)."""
    reads_tail_in_place: bool = False
    """decode_attention takes dense_rows / dense_start: the compressed cache's per-slot tail
    buffer is passed whole and read in place (no per-step gather). Otherwise the cache gathers
    each row's range into dense_k/v [B, KVH, T, D] first."""
    bases = None
    """Calibrated bases of a codec whose K/V live in a reduced space (compress/lowrank.py): a
    prefill group may exchange projected Q/K/V in them. None for every other codec."""

    def __init__(self, num_kv_heads: int, page_size: int, head_dim: int):
        require_head_dim(self.name, self.head_dim_multiple, head_dim)
        self.kvh, self.page_size, self.head_dim = num_kv_heads, page_size, head_dim

    @abstractmethod
    def new_store(self, num_pages: int, device: torch.device) -> Store:
        """Zeroed storage for num_pages pages of one layer."""

    @abstractmethod
    def encode(
        self, store: Store, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write full pages: k, v [n, KVH, P, D] into store pages page_ids [n]."""

    @abstractmethod
    def dequantize(self, store: Store, page_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(k, v) fp32 [n, KVH, P, D] of pages page_ids (tests and the quality reference)."""

    def dequantize_into(
        self, pages: Store, page_ids: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor
    ) -> None:
        """decode_kv=dense: write the K/V of every page of `pages` (a store of n pages, e.g. as
        received) into pages page_ids [n] of a dense pool's out_k/out_v [N, KVH, P, D], in the
        model's basis. This default goes through `dequantize`; codecs with a kernel override it
        (kernels/dequant_pages.py: Triton on CUDA, its torch reference elsewhere)."""
        n = next(iter(pages.values())).shape[0]
        k, v = self.dequantize(pages, torch.arange(n, device=out_k.device))  # [n, KVH, P, D]
        ids = page_ids.to(out_k.device)
        out_k[ids], out_v[ids] = k.to(out_k.dtype), v.to(out_v.dtype)

    @abstractmethod
    def page_bytes_per_token(self) -> float:
        """Stored bytes of one full page per token and KV head, K and V together."""

    def decode_attention(
        self, q, store, page_table, n_full, dense_k, dense_v, dense_lens, scale, num_splits=1
    ):
        """Attention of q [B, H, D] over n_full[b] pages + a dense tail; [B, H, D]."""
        return dequant_decode_attention(
            self, q, store, page_table, n_full, dense_k, dense_v, dense_lens, scale
        )

    def prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v, scale):
        """A prefill chunk attending to its sequence's encoded pages, sinks and itself (causal).

        q [n, H, D], k/v [n, KVH, D] (the chunk, starting on a page boundary); past_pages [m]
        ids of the full pages before it; sink_k/v [KVH, S, D] the dense sinks (used when m > 0).
        Returns [n, H, D]. This default dequantizes (the reference); codecs with a kernel override.
        """
        return compressed_past_prefill_attention(
            self, q, k, v, store, past_pages, sink_k, sink_v, scale
        )

    # Hooks of codecs whose values live in a reduced space (compress/lowrank.py); the identity
    # for every other codec.
    def to_dense(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New k/v [.., KVH, D] -> the form kept in the 16-bit open page and sinks (the compressed
        cache attends to that form, in prefill too)."""
        return k, v

    def seal(self, store: Store, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Encode full pages given in the dense form (a filled open page) [n, KVH, P, D]."""
        self.encode(store, page_ids, k, v)

    def seal_rows(
        self,
        store: Store,
        page_ids: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: torch.Tensor,
        skip_page: int,
    ) -> None:
        """A decode step's seal: rows [n] of the open pages k/v [slots, KVH, P, D] into page_ids
        [n]; rows whose page is skip_page (the scratch page: no page filled) may be skipped.
        This default gathers the rows and seals them all; HACK reads them in place and skips."""
        self.seal(store, page_ids, k[rows.long()], v[rows.long()])

    def prepare_model(self, model: torch.nn.Module, fold: bool = True) -> None:  # noqa: B027
        """Adapt a loaded model to this codec's pages, once, before it runs (lowrank: its
        attention output stays reduced, V's basis folded into W_o; `fold` False lifts it back
        every step instead). Nothing for every other codec."""

    def for_layer(self, layer: int) -> KVCodec:
        """The codec of one layer (the same for every layer except where ranks differ)."""
        return self

    def num_splits(self, batch: int, max_len: int, num_sms: int) -> int:
        """Flash-decoding splits this codec's kernel wants for a batch (host heuristic)."""
        return choose_num_splits(batch, self.kvh, max_len, num_sms=num_sms)

    def bytes_per_token(
        self, num_layers: int, seq_len: int | None = None, dense_bytes: int = 2
    ) -> float:
        """Bytes per token of one sequence over all layers. With seq_len, the 16-bit open page
        and sinks of a sequence of that length are amortized in."""
        full = self.kvh * sum(self.for_layer(i).page_bytes_per_token() for i in range(num_layers))
        if seq_len is None:
            return full
        n_full_tokens = (seq_len // self.page_size) * self.page_size
        dense_tokens = seq_len - n_full_tokens + (self.n_sink if n_full_tokens else 0)
        dense = num_layers * self.kvh * 2 * self.head_dim * dense_bytes
        return (full * n_full_tokens + dense * dense_tokens) / seq_len

    def store_nbytes(self, store: Store) -> int:
        return sum(t.numel() * t.element_size() for t in store.values())
