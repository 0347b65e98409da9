"""One member of a prefill group: the model, the codec and this rank's process-group handle.

`GroupRank` is plain Python; local.py runs N of them as processes, actors.py as Ray actors.
`prefill` runs this rank's slice of one prompt and returns a `RankResult`: the last rank's
logits, this rank's KV slices (one `SliceKV` per layer, already encoded with the codec) and
the byte records of every all-to-all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zipserve.compress.codecs import make_codec
from zipserve.compress.wire import SliceKV
from zipserve.engine.loading import build_model, model_config_for
from zipserve.prefill_group.exchange import ByteCounter, Exchange, ExchangeRecord
from zipserve.prefill_group.group import make_group
from zipserve.prefill_group.plan import UnsupportedSplit, plan_heads, token_slices
from zipserve.prefill_group.slices import export_slice
from zipserve.prefill_group.ulysses import RankContext, ulysses_prefill


@dataclass
class RankResult:
    rank: int
    logits: torch.Tensor | None
    """[1, V] fp32 of the prompt's last token (last rank), [t, V] with all_logits, else None."""
    slices: list[SliceKV]
    """Every layer's slice (empty when they went to a sink as they were computed)."""
    kv_bytes: int
    """Bytes of this rank's encoded KV slices (pages + tails)."""
    dense_bytes: int
    """What the same slices take uncompressed (post-RoPE K and V in the model's dtype)."""
    records: list[ExchangeRecord]
    seconds: float
    raw_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """keep_raw only: (k, v) [t, KVH, D] per layer, post-RoPE, before any codec (tests)."""


class GroupRank:
    def __init__(
        self,
        model: str,
        codec: str,
        rank: int,
        n: int,
        page_size: int = 64,
        device: str | None = None,
        dtype: str | None = "auto",
        max_positions: int | None = None,
        lowrank_exchange: bool = True,
        seed: int = 0,
    ):
        """Refuses (UnsupportedSplit) a group size the model's heads cannot be split over."""
        cfg = model_config_for(model)
        if getattr(cfg, "lckv", None) is not None:
            raise UnsupportedSplit("prefill group: LCKV checkpoints are not supported")
        self.split = plan_heads(cfg.num_heads, cfg.num_kv_heads, n)
        self.rank, self.n, self.page_size, self.codec_name = rank, n, page_size, codec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config, self.model, self.dtype = build_model(
            model, dtype, self.device, max_positions or cfg.max_position_embeddings, seed
        )
        model_dir = None if model.startswith("random:") else model
        self.codec = make_codec(
            codec, cfg.num_kv_heads, page_size, cfg.head_dim, model_dir, dtype=self.dtype
        )
        # a codec whose K/V live in a reduced space (lowrank) has bases to exchange in
        self.bases = self.codec.bases if lowrank_exchange else None
        self.group = None

    def connect(
        self, store_addr: str, port: int, timeout_s: float = 60.0, name: str = "prefill-group"
    ) -> None:
        """Form the process group with the other n-1 ranks (blocks until all have come)."""
        if self.n > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            self.group = make_group(
                store_addr,
                port,
                self.rank,
                self.n,
                backend,
                timeout_s,
                name,
                self.device if backend == "nccl" else None,
            )

    def prefill(
        self,
        token_ids: list[int],
        keep_raw: bool = False,
        all_logits: bool = False,
        sink: Callable[[SliceKV], None] | None = None,
    ) -> RankResult:
        """This rank's part of one prompt (every rank gets the same token_ids). sink: called
        with each layer's encoded slice as soon as that layer's K/V exist (to send it while
        the next layers compute); without one the slices come back in the result."""
        if len(token_ids) > self.model.rope.cos.shape[0]:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens, the group's model holds "
                f"{self.model.rope.cos.shape[0]} positions"
            )
        slices = token_slices(len(token_ids), self.n, self.page_size)
        me = slices[self.rank]
        counter = ByteCounter()
        ctx = RankContext(
            self.rank,
            self.split,
            slices,
            Exchange(self.group and self.group.pg, self.rank, self.n, counter),
        )
        out: list[SliceKV] = []
        raw: list[tuple[torch.Tensor, torch.Tensor]] = []
        kv_bytes, dense_bytes = [0], [0]

        def on_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v: [t, KVH, D]
            s = export_slice(
                self.codec.for_layer(layer),
                self.codec_name,
                layer,
                k,
                v,
                me.start,
                len(token_ids),
                self.page_size,
                self.rank,
            )
            kv_bytes[0] += s.nbytes()
            dense_bytes[0] += k.nbytes + v.nbytes
            if sink is not None:
                sink(s)
            else:
                out.append(s)
            if keep_raw:
                raw.append((k.cpu().clone(), v.cpu().clone()))

        ids = torch.tensor(token_ids[me.start : me.end], dtype=torch.long, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        logits = ulysses_prefill(self.model, ids, ctx, self.bases, on_kv, all_logits)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        return RankResult(
            self.rank,
            None if logits is None else logits.cpu(),
            out,
            kv_bytes[0],
            dense_bytes[0],
            counter.records,
            dt,
            raw,
        )

    def share_group(self, other: GroupRank) -> None:
        """Use another member's process group (same rank and size: several models or codecs
        in one process)."""
        if (other.rank, other.n) != (self.rank, self.n):
            raise ValueError("share_group: rank/size differ")
        self.group = other.group

    def close(self) -> None:
        self.group = None
