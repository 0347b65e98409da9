"""The engine's KV memory when a codec is on: encoded full pages + 16-bit open pages and sinks.

Full pages live in the codec's store, indexed by the same page ids the PagePool hands out.
Each running sequence also owns a slot: its open page (the last, partly filled one, 16-bit) and
its sinks (first n_sink tokens, 16-bit, for codecs that keep them). When a decode step fills the
open page it is encoded into the sequence's page once and never touched again. Prefill chunks
must start on a page boundary (a whole prompt, chunks of max_prefill_chunk, page-sized chunks when
scoring, or the suffix after a cached prefix: engine/prefix_cache.py, which carries the sinks of
a cached first page through `prefix_state` / `restore_prefix_state`).
Codecs whose values live in a reduced space (lowrank) keep the open page and sinks in their
`to_dense` form, and a filled open page is sealed with `seal`. One of the three `PagedKVCache`s
(engine/paged_cache.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from zipserve.compress.codec import KVCodec
from zipserve.compress.condensed_attention import attend_past as condensed_attend_past
from zipserve.compress.condensed_attention import past_kv
from zipserve.compress.wire import WirePages, adopt_pages
from zipserve.engine.attention import prefill_attention
from zipserve.engine.config import ModelConfig
from zipserve.engine.paged_cache import LayerPages

if TYPE_CHECKING:
    from zipserve.engine.sequence import Sequence


class CompressedKVCache:
    scores_by_page = True
    """Full pages hold codes: a sequence is scored page by page, as decode reads it."""

    def __init__(
        self,
        codec: KVCodec,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.codec, self.num_pages, self.page_size = codec, num_pages, page_size
        self.n_sink = codec.n_sink
        self.scratch_slot = num_slots - 1
        """Open-page slot that CUDA-graph padding rows write to (no sequence owns it)."""
        self.codecs = [codec.for_layer(i) for i in range(config.num_kv_layers)]
        self.stores = [c.new_store(num_pages, device) for c in self.codecs]
        kvh, d = config.num_kv_heads, config.head_dim
        # [layers, 2 (K, V), slots, KVH, P, D] and [layers, 2, slots, KVH, n_sink, D]
        nl = config.num_kv_layers  # only KV layers have pages (fewer in an LCKV model)
        self.open = torch.zeros(nl, 2, num_slots, kvh, page_size, d, dtype=dtype, device=device)
        self.sinks = torch.zeros(
            nl, 2, num_slots, kvh, max(self.n_sink, 1), d, dtype=dtype, device=device
        )

    @property
    def graph_safe(self) -> bool:
        return self.codec.graph_safe

    @staticmethod
    def bytes_per_page(codec: KVCodec, config: ModelConfig, page_size: int) -> int:
        return int(
            config.num_kv_heads
            * page_size
            * sum(codec.for_layer(i).page_bytes_per_token() for i in range(config.num_kv_layers))
            + 0.5
        )

    def attention(self, layer: int, q, k, v, batch, scale: float) -> torch.Tensor:
        if batch.is_prefill:
            return self._prefill(layer, q, k, v, batch, scale)
        return self._decode(layer, q, k, v, batch, scale)

    def decode_splits(self, batch: int, max_len: int, num_sms: int) -> int:
        """The codec kernel's own heuristic (HACK: exactly one wave of resident programs, where
        the bf16 kernel's "two per SM, rounded up" starts a second, mostly empty wave)."""
        return self.codec.num_splits(batch, max_len, num_sms)

    def attend_past(self, layer: int, q, batch, scale: float) -> torch.Tensor:
        """Decode, read only: attend to positions before the current token (LCKV)."""
        return condensed_attend_past(self, layer, q, batch, scale)

    def past_kv(self, layer: int, slot: int, past_pages: list[int]):
        """[N, KVH, D] K/V of the full pages before a prefill chunk (LCKV chunked scoring)."""
        return past_kv(self, layer, slot, past_pages)

    def prefix_state(self, slot: int) -> torch.Tensor | None:
        """The slot's sinks [layers, 2, KVH, n_sink, D] (16-bit, the first n_sink tokens: a
        function of the first page's tokens alone), copied; None for codecs without sinks."""
        if not self.n_sink:
            return None
        return self.sinks[:, :, slot, :, : self.n_sink].clone()

    def restore_prefix_state(self, slot: int, state: torch.Tensor) -> None:
        """Sinks saved by prefix_state into `slot` (a sequence reusing that first page)."""
        self.sinks[:, :, slot, :, : self.n_sink] = state

    def export_pages(self, layer: int, seq: Sequence, num_tokens: int) -> LayerPages:
        """The encoded full pages and the 16-bit tail as [KVH, t, D] views: the open page's r
        tokens, and the sinks once a page is encoded (before that the sinks are the open page's
        first tokens: not sent twice, the receiver takes them from there)."""
        n_full = num_tokens // self.page_size
        r = num_tokens - n_full * self.page_size
        tail = {
            "open_k": self.open[layer, 0, seq.slot, :, :r],
            "open_v": self.open[layer, 1, seq.slot, :, :r],
        }
        if self.n_sink and n_full:
            s = min(self.n_sink, num_tokens)
            tail["sink_k"] = self.sinks[layer, 0, seq.slot, :, :s]
            tail["sink_v"] = self.sinks[layer, 1, seq.slot, :, :s]
        return LayerPages(
            self.codecs[layer].name,
            self.stores[layer],
            torch.tensor(seq.pages[:n_full], dtype=torch.long),
            tail,
        )

    def import_pages(
        self, layer: int, pages: WirePages, tail: dict[str, torch.Tensor], seq: Sequence
    ) -> None:
        """Adopt the encoded pages into seq's reserved pages, the tail into its slot."""
        ids = torch.tensor(seq.pages[: pages.num_pages], dtype=torch.long)
        if len(ids) != pages.num_pages:
            raise ValueError(
                f"layer {layer}: {pages.num_pages} pages arrived for {len(seq.pages)} reserved"
            )
        adopt_pages(self.codecs[layer].name, self.stores[layer], ids, pages)
        dev = self.open.device
        if "open_k" not in tail:
            raise ValueError(f"layer {layer}: the 16-bit tail is missing")
        r = tail["open_k"].shape[1]
        self.open[layer, 0, seq.slot, :, :r] = tail["open_k"].to(dev)
        self.open[layer, 1, seq.slot, :, :r] = tail["open_v"].to(dev)
        if not self.n_sink:
            return
        if "sink_k" in tail:
            sink_k, sink_v = tail["sink_k"], tail["sink_v"]
        elif pages.num_pages == 0:  # no page encoded yet: the sinks lead the open page
            s = min(self.n_sink, r)
            sink_k, sink_v = tail["open_k"][:, :s], tail["open_v"][:, :s]
        else:
            raise ValueError(f"layer {layer}: the sink tokens are missing")
        s = sink_k.shape[1]
        self.sinks[layer, 0, seq.slot, :, :s] = sink_k.to(dev)
        self.sinks[layer, 1, seq.slot, :, :s] = sink_v.to(dev)

    def _prefill(self, layer, q, k, v, batch, scale):
        p, store = self.page_size, self.stores[layer]
        open_k, open_v = self.open[layer]
        sink_k, sink_v = self.sinks[layer]
        outs, t0 = [], 0
        for slot, pages, start, n in batch.prefill_seqs:
            if start % p:
                raise ValueError(f"prefill chunk starts at {start}, not on a page boundary")
            qs, ks, vs = q[t0 : t0 + n], k[t0 : t0 + n], v[t0 : t0 + n]  # [n, h, D]
            kd, vd = self.codecs[layer].to_dense(ks, vs)  # what the open page / sinks keep
            first, nf = start // p, n // p
            if nf:
                ids = torch.tensor(pages[first : first + nf], device=k.device)
                self.codecs[layer].encode(
                    store, ids, _as_pages(ks[: nf * p], p), _as_pages(vs[: nf * p], p)
                )
            r = n - nf * p
            open_k[slot, :, :r] = kd[nf * p :].transpose(0, 1)
            open_v[slot, :, :r] = vd[nf * p :].transpose(0, 1)
            if start == 0 and self.n_sink:
                m = min(self.n_sink, n)
                sink_k[slot, :, :m] = kd[:m].transpose(0, 1)
                sink_v[slot, :, :m] = vd[:m].transpose(0, 1)
            if start == 0:  # the prompt itself attends exactly; its KV is kept compressed
                outs.append(prefill_attention(qs, kd, vd, [n], scale))
            else:
                past = torch.tensor(pages[:first], device=k.device)
                outs.append(
                    self.codecs[layer].prefill_attention(
                        qs,
                        kd,
                        vd,
                        store,
                        past,
                        sink_k[slot, :, : self.n_sink],
                        sink_v[slot, :, : self.n_sink],
                        scale,
                    )
                )
            t0 += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _decode(self, layer, q, k, v, batch, scale):
        p, s = self.page_size, self.n_sink
        k, v = self.codecs[layer].to_dense(k, v)
        open_k, open_v = self.open[layer]  # [slots, KVH, P, D]
        slots, pos, n_full = batch.slots, batch.positions, batch.n_full
        off = pos % p
        open_k[slots, :, off] = k
        open_v[slots, :, off] = v
        o_k, o_v = open_k[slots], open_v[slots]  # [B, KVH, P, D]
        if s:
            sink_k, sink_v = self.sinks[layer]
            idx = pos.clamp(max=s - 1)
            is_sink = (pos < s)[:, None, None]
            sink_k[slots, :, idx] = torch.where(is_sink, k, sink_k[slots, :, idx])
            sink_v[slots, :, idx] = torch.where(is_sink, v, sink_v[slots, :, idx])
            # Sinks are attended densely once the first page is encoded; before that they are
            # the open page's own first tokens, so the open page is shifted to follow them.
            first_page = (n_full == 0)[:, None, None, None]
            dense_k = torch.cat([sink_k[slots], torch.where(first_page, _shift(o_k, s), o_k)], 2)
            dense_v = torch.cat([sink_v[slots], torch.where(first_page, _shift(o_v, s), o_v)], 2)
            dense_lens = torch.where(n_full == 0, off + 1, off + 1 + s).to(torch.int32)
        else:
            dense_k, dense_v, dense_lens = o_k, o_v, (off + 1).to(torch.int32)
        codec = self.codecs[layer]
        out = codec.decode_attention(
            q,
            self.stores[layer],
            batch.page_table,
            n_full,
            dense_k,
            dense_v,
            dense_lens,
            scale,
            batch.num_splits,
        )
        # A token that fills its page seals it; other rows encode into the scratch page.
        codec.seal(self.stores[layer], batch.seal_pages, open_k[slots], open_v[slots])
        return out


def _as_pages(x: torch.Tensor, p: int) -> torch.Tensor:
    """[n*P, KVH, D] -> [n, KVH, P, D]."""
    return x.view(-1, p, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()


def _shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """Drop the first s tokens of an open page [B, KVH, P, D] (they are the sinks), pad at the end."""
    return torch.cat([x[:, :, s:], torch.zeros_like(x[:, :, :s])], 2)
