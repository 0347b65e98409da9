"""Turns scheduled sequences into a ForwardBatch, runs the model (eagerly or from a CUDA graph)
and returns the logits of each sequence's next token.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from zipserve.compress.device_copy import to_device_nowait
from zipserve.engine.config import EngineConfig, ModelConfig
from zipserve.engine.cuda_graphs import DecodeGraphs
from zipserve.engine.model import ForwardBatch, LlamaModel
from zipserve.engine.page_pool import pages_for
from zipserve.engine.paged_cache import PagedKVCache
from zipserve.engine.sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        cache: PagedKVCache,
        config: ModelConfig,
        engine_config: EngineConfig,
        max_model_len: int,
        device: torch.device,
    ):
        self.model, self.cache, self.config = model, cache, config
        self.page_size = engine_config.page_size
        self.device = device
        self.max_model_len = max_model_len
        self.max_pages_per_seq = pages_for(max_model_len, self.page_size)
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )
        self.fixed_splits = engine_config.decode_splits
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not cache.graph_safe:
            log.warning(
                "this engine's KV cache is not marked graph-safe on CUDA (its codec's decode "
                "was not checked under CUDA graphs on a GPU): decode runs "
                "eagerly, one launch at a time; expect it slower than bf16's"
            )
        if device.type == "cuda" and engine_config.cuda_graphs and cache.graph_safe:
            sizes = [b for b in engine_config.graph_batch_sizes if b <= engine_config.max_num_seqs]
            self.graphs = DecodeGraphs(
                model, cache, sizes, self.max_pages_per_seq, self._splits_for, device
            )

    def _splits_for(self, batch_size: int) -> int:
        if self.fixed_splits:
            return self.fixed_splits
        return self.cache.decode_splits(batch_size, self.max_model_len, self.num_sms)

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        """A step's host values on the device through pinned memory: a pageable copy, even a
        non-blocking one, may make the host wait for the stream (CUDA stages it)."""
        return to_device_nowait(torch.as_tensor(values, dtype=dtype), self.device)

    def prefill(
        self,
        seqs: list[Sequence],
        all_logits: bool = False,
        on_layer_done=None,
        ends: list[int] | None = None,
    ) -> torch.Tensor:
        """Run every token of each sequence not yet cached (up to ends[i] tokens when given: a
        chunk of the prompt); logits [B, V] at each last token run (or [T, V] for every token
        when all_logits)."""
        ids, positions, pages, offsets, lens, meta = [], [], [], [], [], []
        ends = ends if ends is not None else [seq.num_tokens for seq in seqs]
        for seq, end in zip(seqs, ends):
            if not seq.num_cached < end <= seq.num_tokens:
                raise ValueError(
                    f"prefill: chunk end {end} outside ({seq.num_cached}, "
                    f"{seq.num_tokens}] for sequence {seq.seq_id}"
                )
            meta.append((seq.slot, seq.pages, seq.num_cached, end - seq.num_cached))
            toks = seq.all_ids[seq.num_cached : end]
            pos = np.arange(seq.num_cached, seq.num_cached + len(toks))
            ids.extend(toks)
            positions.append(pos)
            pages.append(np.asarray(seq.pages, dtype=np.int64)[pos // self.page_size])
            offsets.append(pos % self.page_size)
            lens.append(len(toks))
        last = np.cumsum(lens) - 1
        batch = ForwardBatch(
            input_ids=self._tensor(ids),
            positions=self._tensor(np.concatenate(positions)),
            write_pages=self._tensor(np.concatenate(pages)),
            write_offsets=self._tensor(np.concatenate(offsets)),
            is_prefill=True,
            seq_lens_host=lens,
            prefill_seqs=meta,
            on_layer_done=on_layer_done,
            logits_indices=None if all_logits else self._tensor(last),
        )
        logits = self.model(batch, self.cache)
        for seq, end in zip(seqs, ends):
            seq.num_cached = end
        return logits

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token per sequence (its last); logits [B, V]."""
        b = len(seqs)
        pos = np.fromiter((s.num_cached for s in seqs), dtype=np.int64, count=b)
        write_pages = np.fromiter(
            (s.pages[p // self.page_size] for s, p in zip(seqs, pos)), dtype=np.int64, count=b
        )
        width = (
            self.max_pages_per_seq
            if self.graphs and self.graphs.fits(b)
            else max(len(s.pages) for s in seqs)
        )
        table = np.zeros((b, width), dtype=np.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.pages)] = s.pages
        host = dict(
            input_ids=np.fromiter((s.last_token for s in seqs), dtype=np.int64, count=b),
            positions=pos,
            write_pages=write_pages,
            write_offsets=pos % self.page_size,
            page_table=table,
            seq_lens=(pos + 1).astype(np.int32),
            slots=np.fromiter((s.slot for s in seqs), dtype=np.int64, count=b),
            n_full=(pos // self.page_size).astype(np.int32),
            seal_pages=np.where((pos + 1) % self.page_size == 0, write_pages, 0),
        )
        if self.graphs is not None and self.graphs.fits(b):
            logits = self.graphs.run(host)
        else:
            batch = ForwardBatch(
                input_ids=self._tensor(host["input_ids"]),
                positions=self._tensor(pos),
                write_pages=self._tensor(write_pages),
                write_offsets=self._tensor(host["write_offsets"]),
                is_prefill=False,
                page_table=self._tensor(table, torch.int32),
                seq_lens=self._tensor(host["seq_lens"], torch.int32),
                num_splits=self._splits_for(b),
                slots=self._tensor(host["slots"]),
                n_full=self._tensor(host["n_full"], torch.int32),
                seal_pages=self._tensor(host["seal_pages"]),
            )
            logits = self.model(batch, self.cache)
        for s in seqs:
            s.num_cached += 1
        return logits
