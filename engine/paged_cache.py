"""The one interface the engine calls on its paged KV memory, whatever the codec.

Three caches implement it:
- `KVCache` (engine/kv_cache.py): the 16-bit page pool holding a dense-pages codec's pages (bf16),
  attended by the paged bf16 kernel;
- `DenseCodecKVCache` (engine/dense_codec_cache.py): the same pool holding a compressed codec's
  values, dequantized (decode_kv=dense);
- `CompressedKVCache` (compress/compressed_cache.py): the codec's encoded pages plus each
  sequence's 16-bit open page and sinks.
engine/kv_memory.py picks one for an engine's codec and decode_kv. The model calls `attention`
(and `attend_past` / `past_kv` in an LCKV model), the runner reads the flags, the transfer path
(engine/kv_export.py) moves one layer of one sequence out with `export_pages` and in with
`import_pages`. Page ids come from the engine's PagePool; page 0 is the scratch page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from zipserve.compress.codec import KVCodec, Store
from zipserve.compress.wire import WirePages

if TYPE_CHECKING:
    from zipserve.engine.sequence import Sequence


@dataclass
class LayerPages:
    """One layer of one sequence as a cache hands it to the wire: views, nothing copied yet."""

    codec: str
    """The name the pages carry on the wire (the layer's own codec: hack2mix sends hack2/hack4)."""
    store: Store
    """The layer's whole store (name -> [pages, ...]); only page_ids of it travel."""
    page_ids: torch.Tensor
    """[n_full] int64 (CPU): the sequence's full pages."""
    tail: dict[str, torch.Tensor] = field(default_factory=dict)
    """16-bit tokens beside the full pages: open_k/open_v [KVH, r, D] (the partly filled page),
    sink_k/sink_v [KVH, s, D] (a codec's sinks, once a page is encoded)."""


class PagedKVCache(Protocol):
    codec: KVCodec
    """The codec whose pages (or, dense mode, values) the cache holds."""
    page_size: int
    num_pages: int
    scratch_slot: int
    """Slot that CUDA-graph padding rows write their open-page token to (no sequence owns it)."""
    graph_safe: bool
    """A decode step over this cache can be captured in a CUDA graph."""
    scores_by_page: bool
    """`logits` scores a sequence page by page, each token seeing the past as decode would (the
    pages hold a codec's values); False: in one pass (the pages are exact)."""

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch, scale: float
    ) -> torch.Tensor:
        """Store the batch's new K/V, then attend. q [T, H, D], k/v [T, KVH, D] -> [T, H, D]."""

    def decode_splits(self, batch: int, max_len: int, num_sms: int) -> int:
        """Flash-decoding splits of the decode kernel this cache runs, for a batch of sequences
        up to max_len tokens (fixed per batch size: decode graphs capture it)."""

    def attend_past(self, layer: int, q: torch.Tensor, batch, scale: float) -> torch.Tensor:
        """Decode, read only: q [B, H, D] over each sequence's positions before its current token
        (an LCKV condensed layer)."""

    def past_kv(
        self, layer: int, slot: int, past_pages: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [N, KVH, D] of a sequence's full pages before a prefill chunk, as decode reads them
        (LCKV page-by-page scoring; caches that score by page)."""

    def prefix_state(self, slot: int) -> object | None:
        """What a sequence in `slot` keeps outside its pages that depends only on its first page
        (a compressed codec's 16-bit sinks), copied, for the prefix cache to carry with that
        page (engine/prefix_cache.py); None when the pages hold everything."""

    def restore_prefix_state(self, slot: int, state: object) -> None:
        """Write a `prefix_state` into `slot`: a sequence reusing that first page starts with
        what it would have computed itself."""

    def export_pages(self, layer: int, seq: Sequence, num_tokens: int) -> LayerPages:
        """The first num_tokens tokens of seq in layer `layer`, for the wire. ValueError when this
        cache cannot send what it holds (dense mode: values, not codes)."""

    def import_pages(
        self, layer: int, pages: WirePages, tail: dict[str, torch.Tensor], seq: Sequence
    ) -> None:
        """Write a received layer (full pages + 16-bit tail) into seq's reserved pages and slot.
        WireError / ValueError when it is of another codec or layout, or does not fit."""
