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
from zipserve.compress.device_copy import index_on
from zipserve.compress.wire import WirePages, adopt_pages
from zipserve.engine.attention import prefill_attention
from zipserve.engine.config import ModelConfig
from zipserve.engine.kv_cache import SCRATCH_PAGE
from zipserve.engine.paged_cache import LayerPages
from zipserve.kernels import tail_write

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
        nl = config.num_kv_layers  # only KV layers have pages (fewer in an LCKV model)
        s, p = self.n_sink, page_size
        # One 16-bit tail per slot: columns [0, s) the sinks, [s, s + P) the open page, s + P a
        # junk column that non-sink positions write their sink copy to. A decode step's dense
        # tokens are one contiguous range of it ([s, s + off] while no page is sealed: the sinks
        # are the open page's own first tokens; [0, s + off] after), which a codec reading the
        # tail in place takes as (row, start, length) with no copy.
        self.tail = torch.zeros(nl, 2, num_slots, kvh, s + p + 1, d, dtype=dtype, device=device)
        self._junk = s + p
        self.open = self.tail[..., s : s + p, :]  # [layers, 2, slots, KVH, P, D] (a view)
        self.sinks = self.tail[..., : max(s, 1), :] if s else self.tail[..., s + p :, :]
        """[layers, 2, slots, KVH, max(n_sink, 1), D] (a view; the junk column without sinks)."""
        self._step: tuple[object, set[int], dict[str, torch.Tensor]] | None = None
        self._gathers_tail = not all(c.reads_tail_in_place for c in self.codecs)
        """Some layer's codec takes its dense tail gathered (step_index then builds the index)."""

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
                ids = index_on(pages[first : first + nf], k.device)
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
                past = index_on(pages[:first], k.device)
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
        k, v = self.codecs[layer].to_dense(k, v)  # [B, KVH, D]
        ix = self.step_index(batch, layer)
        # The new K/V into each row's open-page column and, with sinks, its sink column (a sink
        # position's own; others write the junk column): one launch on a GPU.
        write = tail_write.write_tail if k.is_cuda else tail_write.write_tail_ref
        col_sink = ix["col_sink"] if self.n_sink else None
        write(self.tail[layer], k, v, batch.slots, ix["col_open"], col_sink)
        out = self.attend_tail(layer, q, batch, scale, ix)
        # A token that fills its page seals it; other rows' seal page is the scratch page.
        open_k, open_v = self.open[layer]  # [slots, KVH, P, D] views
        self.codecs[layer].seal_rows(
            self.stores[layer], batch.seal_pages, open_k, open_v, ix["rows"], SCRATCH_PAGE
        )
        return out

    def attend_tail(self, layer: int, q, batch, scale: float, ix, past_only: bool = False):
        """q [B, H, D] over the encoded full pages + each row's dense tail range (ix: step_index;
        past_only leaves the new token out: LCKV's condensed layers); [B, H, D]."""
        lens = ix["lens"] - 1 if past_only else ix["lens"]
        codec, tail = self.codecs[layer], self.tail[layer]
        if codec.reads_tail_in_place:
            dense_k, dense_v = tail[0], tail[1]  # [slots, KVH, s + P + 1, D]
            where = dict(dense_rows=ix["rows"], dense_start=ix["start"])
        else:  # [B, KVH, s + P, D]: the range gathered, as the codec's kernel takes it
            idx = ix["gather"]
            dense_k = tail[0][batch.slots[:, None], :, idx].transpose(1, 2).contiguous()
            dense_v = tail[1][batch.slots[:, None], :, idx].transpose(1, 2).contiguous()
            where = {}
        return codec.decode_attention(
            q,
            self.stores[layer],
            batch.page_table,
            batch.n_full,
            dense_k,
            dense_v,
            lens,
            scale,
            batch.num_splits,
            **where,
        )

    def step_index(self, batch, layer: int | None = None) -> dict[str, torch.Tensor]:
        """Where a decode step's rows write and read the tail. Computed once per forward pass and
        shared by its layers (a CUDA graph records it once): a layer asking again means a new pass
        with the same batch (graph warm-up, then capture), which computes it again. Without
        `layer` (LCKV's read-only past), always computed."""
        if layer is not None and self._step is not None:
            last, served, ix = self._step
            if last is batch and layer not in served:
                served.add(layer)
                return ix
        s, p = self.n_sink, self.page_size
        pos, first = batch.positions, batch.n_full == 0  # [B]
        off = pos % p
        start = torch.where(first, s, 0).to(torch.int32)  # the sinks lead the open page there
        ix = {
            "col_open": s + off,
            "col_sink": torch.where(pos < s, pos, self._junk),
            "rows": batch.slots.to(torch.int32),
            "start": start,
            "lens": (off + 1 + s - start).to(torch.int32),  # the new token included
        }
        if self._gathers_tail:  # [B, s + P] tail columns of each row's range
            ix["gather"] = (start[:, None] + torch.arange(s + p, device=pos.device)).clamp_max(
                self._junk
            )
        if layer is not None:
            self._step = (batch, {layer}, ix)
        return ix


def _as_pages(x: torch.Tensor, p: int) -> torch.Tensor:
    """[n*P, KVH, D] -> [n, KVH, P, D]."""
    return x.view(-1, p, x.shape[1], x.shape[2]).transpose(1, 2).contiguous()
