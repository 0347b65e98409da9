"""One request's life inside the engine: its tokens, pages, sampling state and outcome."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from zipserve.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    """WAITING -> RUNNING -> FINISHED for a request the engine prefills itself; a request whose
    KV comes from elsewhere is RESERVED -> RUNNING -> FINISHED (preemption: RUNNING -> WAITING)."""

    WAITING = "waiting"  # queued for (re)prefill; holds no pages
    RESERVED = "reserved"  # holds pages and a slot; its KV is being written (arriving/computed)
    RUNNING = "running"  # in the decode batch; holds pages for num_cached tokens
    FINISHED = "finished"  # done; pages returned


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    slot: int = -1
    """Open-page slot of a running sequence (compressed caches), -1 when it holds none."""
    num_cached: int = 0
    """Tokens whose K/V are in this sequence's pages."""
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache at admission (engine/prefix_cache.py)
    instead of being computed; the first admission's count (not redone after a preemption)."""
    page_hashes: list[bytes] = field(default_factory=list)
    """Chained hashes of this sequence's full pages computed so far (engine/prefix_cache.py)."""
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    """'stop' (EOS, stop token or stop string), 'length' (max_tokens or context), 'abort'."""
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    output_text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    detok: object | None = None
    """Incremental detokenizer (engine.detokenizer.Detokenizer)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def reserved(self) -> bool:
        return self.status is SeqStatus.RESERVED

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
