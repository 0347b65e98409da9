"""CUDA graphs of the decode step, one per batch-size bucket, so a step costs one launch.

A batch of b sequences runs in the smallest captured bucket >= b; the padded rows have
seq_len 0 (the attention kernel skips them) and write their K/V to the scratch page. With a
compressed cache they also use its scratch open-page slot, have no full pages and seal into
the scratch page, so they touch no sequence's memory.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import torch

from zipserve.compress.device_copy import pinned
from zipserve.engine.kv_cache import SCRATCH_PAGE
from zipserve.engine.model import ForwardBatch, LlamaModel
from zipserve.engine.paged_cache import PagedKVCache


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        cache: PagedKVCache,
        batch_sizes: list[int],
        max_pages_per_seq: int,
        splits_for: Callable[[int], int],
        device: torch.device,
    ):
        self.sizes = sorted(set(batch_sizes))
        n = self.sizes[-1]
        self.scratch_slot = cache.scratch_slot

        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.inputs = dict(
            input_ids=zeros(n),
            positions=zeros(n),
            write_pages=torch.full((n,), SCRATCH_PAGE, dtype=torch.int64, device=device),
            write_offsets=zeros(n),
            page_table=zeros(n, max_pages_per_seq, dtype=torch.int32),
            seq_lens=zeros(n, dtype=torch.int32),
            slots=torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device),
            n_full=zeros(n, dtype=torch.int32),
            seal_pages=torch.full((n,), SCRATCH_PAGE, dtype=torch.int64, device=device),
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        for b in reversed(self.sizes):  # largest first so smaller graphs reuse its memory
            batch = ForwardBatch(
                input_ids=self.inputs["input_ids"][:b],
                positions=self.inputs["positions"][:b],
                write_pages=self.inputs["write_pages"][:b],
                write_offsets=self.inputs["write_offsets"][:b],
                is_prefill=False,
                page_table=self.inputs["page_table"][:b],
                seq_lens=self.inputs["seq_lens"][:b],
                num_splits=splits_for(b),
                slots=self.inputs["slots"][:b],
                n_full=self.inputs["n_full"][:b],
                seal_pages=self.inputs["seal_pages"][:b],
            )
            model(batch, cache)  # warm up: compiles the Triton kernels for this shape
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = model(batch, cache)
            except RuntimeError as e:  # torch.AcceleratorError included
                raise RuntimeError(
                    f"cuda_graphs: capturing the decode step of {b} rows failed ({e}); an op in "
                    "it waits for the device (tests/host_sync.py finds such ops on the CPU). "
                    "engine option cuda_graphs=false decodes eagerly"
                ) from e
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(device)

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(self, host: dict[str, np.ndarray]) -> torch.Tensor:
        """Replay the bucket for len(host['input_ids']) rows; logits [b, V]."""
        b = len(host["input_ids"])
        bucket = self.sizes[bisect.bisect_left(self.sizes, b)]
        for name, value in host.items():
            dst = self.inputs[name]
            src = pinned(value)  # a pageable copy may make the host wait for the stream
            if name == "page_table":
                dst[:b, : src.shape[1]].copy_(src, non_blocking=True)
            else:
                dst[:b].copy_(src, non_blocking=True)
        # Padding rows: attend to nothing, write to the scratch page.
        self.inputs["seq_lens"][b:bucket].zero_()
        self.inputs["write_pages"][b:bucket].fill_(SCRATCH_PAGE)
        self.inputs["slots"][b:bucket].fill_(self.scratch_slot)
        self.inputs["n_full"][b:bucket].zero_()
        self.inputs["seal_pages"][b:bucket].fill_(SCRATCH_PAGE)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:b]
