"""decode_kv=dense: the engine's dense paged pool (engine/kv_cache.py) holding a compressed codec's
values, so decode runs the bf16 paged kernel while the prompt keeps the codec's quality.

- A received layer (the codec's wire form: encoded full pages + the 16-bit tail, exactly what a
  compressed receiver gets) is written by `import_pages`: its pages are dequantized straight into
  the reserved pages in one kernel (codec.dequantize_into, kernels/dequant_pages.py), then the
  16-bit open-page tokens and the 16-bit sinks over their positions. For the prompt the pool then
  holds what the compressed engine attends to: the codes' values at every full-page position
  but the sinks, the sinks and the open page in 16-bit.
- A prompt prefilled on this engine (LLM(..., decode_kv="dense"), recompute after preemption,
  `logits`) gets the same values: once a prefill chunk has attended (exactly, as in the
  compressed engine), each of its full pages is encoded and dequantized in place, sinks kept.
- The pool holds the codec's dense form (`to_dense`, what a compressed engine's open page holds):
  for the low-rank codecs K at full dimension and V in its completed basis, which the model's
  folded W_o takes (compress/lowrank.py); for the others k and v as the model made them.
- Generated tokens stay 16-bit: the compressed engine seals a filled open page to codes, this
  one keeps it dense. Within the first open page both attend to the same values.
- It cannot export: its pages no longer carry the codec's codes (prefill engines run
  decode_kv=compressed); `export_pages` refuses.
"""

from __future__ import annotations

import torch

from zipserve.compress.codec import KVCodec
from zipserve.compress.device_copy import index_on
from zipserve.compress.wire import WirePages, check_layout
from zipserve.engine.config import ModelConfig
from zipserve.engine.kv_cache import KVCache
from zipserve.engine.paged_cache import LayerPages
from zipserve.engine.sequence import Sequence


class DenseCodecKVCache(KVCache):
    scores_by_page = True
    """The prompt's full pages hold the codec's values: scored page by page, as decode sees it."""

    def __init__(
        self,
        codec: KVCodec,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__(config, num_pages, page_size, dtype, device, codec=codec)
        self.codecs = [codec.for_layer(i) for i in range(config.num_kv_layers)]
        self.n_sink = codec.n_sink

    def attention(self, layer: int, q, k, v, batch, scale: float) -> torch.Tensor:
        # the pool keeps the codec's dense form, as a compressed engine's open page does (lowrank
        # without its fold: v in V's completed basis; every other codec: k, v as they are)
        k, v = self.codecs[layer].to_dense(k, v)  # [T, KVH, D] each
        out = super().attention(layer, q, k, v, batch, scale)
        if batch.is_prefill and batch.prefill_seqs:
            self._to_codec_values(layer, batch.prefill_seqs)
        return out

    def export_pages(self, layer: int, seq: Sequence, num_tokens: int) -> LayerPages:
        raise ValueError(
            f"decode_kv: a dense-mode engine holds {self.codec.name}'s values "
            f"dequantized, not its codes, and cannot export them; prefill engines "
            f"run decode_kv='compressed'"
        )

    def _to_codec_values(self, layer: int, prefill_seqs) -> None:
        """Replace the full pages each prefill chunk wrote by their encoded-then-dequantized
        values (sinks kept 16-bit); the chunk's partly filled last page stays 16-bit."""
        p, codec = self.page_size, self.codecs[layer]
        k_pages, v_pages = self.layer(layer)  # [pages, KVH, P, D]
        for _slot, pages, start, n in prefill_seqs:
            if start % p:
                raise ValueError(f"prefill chunk starts at {start}, not on a page boundary")
            first, nf = start // p, n // p
            if not nf:
                continue
            ids = index_on(pages[first : first + nf], k_pages.device)
            s = self.n_sink if first == 0 else 0
            sinks = (k_pages[pages[0], :, :s].clone(), v_pages[pages[0], :, :s].clone())
            scratch = codec.new_store(nf, k_pages.device)
            local = torch.arange(nf, device=k_pages.device)
            codec.seal(scratch, local, k_pages[ids], v_pages[ids])  # [nf, KVH, P, D], dense form
            codec.dequantize_into(scratch, ids, k_pages, v_pages)
            if s:
                k_pages[pages[0], :, :s], v_pages[pages[0], :, :s] = sinks

    def import_pages(
        self, layer: int, wire: WirePages, tail: dict[str, torch.Tensor], seq: Sequence
    ) -> None:
        """Write one received layer of the codec's wire form into seq's reserved pages.
        WireError / ValueError when it is of another codec or layout, or its tail is malformed."""
        codec = self.codecs[layer]
        k_pages, v_pages = self.layer(layer)
        dev, p, n = k_pages.device, self.page_size, wire.num_pages
        check_layout(wire, codec.name, codec.new_store(0, dev), " (dequantized: decode_kv=dense)")
        if n > len(seq.pages):
            raise ValueError(f"layer {layer}: {n} pages arrived for {len(seq.pages)} reserved")
        if n:
            ids = index_on(seq.pages[:n], dev)
            pages = {name: t.to(dev) for name, t in wire.tensors.items()}
            codec.dequantize_into(pages, ids, k_pages, v_pages)
        if "open_k" not in tail or "open_v" not in tail:
            raise ValueError(f"layer {layer}: the 16-bit tail is missing")
        open_k, open_v = tail["open_k"], tail["open_v"]  # [KVH, r, D]
        r = _check_tail("open", open_k, open_v, k_pages, p - 1, layer)
        if r:
            if len(seq.pages) <= n:
                raise ValueError(
                    f"layer {layer}: {n} pages and {r} more tokens arrived for "
                    f"{len(seq.pages)} reserved pages"
                )
            k_pages[seq.pages[n], :, :r] = open_k.to(dev)
            v_pages[seq.pages[n], :, :r] = open_v.to(dev)
        if self.n_sink and n:  # before a page is encoded the sinks are the open page's tokens
            if "sink_k" not in tail or "sink_v" not in tail:
                raise ValueError(f"layer {layer}: the sink tokens are missing")
            s = _check_tail("sink", tail["sink_k"], tail["sink_v"], k_pages, self.n_sink, layer)
            k_pages[seq.pages[0], :, :s] = tail["sink_k"].to(dev)
            v_pages[seq.pages[0], :, :s] = tail["sink_v"].to(dev)


def _check_tail(
    what: str, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, max_tokens: int, layer: int
) -> int:
    """Tokens of a tail pair [KVH, t, D]; ValueError when its shape does not fit the pool."""
    kvh, d = k_pages.shape[1], k_pages.shape[3]
    if (
        k.dim() != 3
        or k.shape != v.shape
        or k.shape[0] != kvh
        or k.shape[2] != d
        or k.shape[1] > max_tokens
    ):
        raise ValueError(
            f"layer {layer}: {what} tokens of shape {tuple(k.shape)} / "
            f"{tuple(v.shape)}, expected [KVH={kvh}, <= {max_tokens}, D={d}]"
        )
    return int(k.shape[1])
