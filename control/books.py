"""What a backend keeps about the jobs in flight on each of its workers: the load the pair choice
sorts by and /health reports, the request path's failure counts, and which decode worker holds
each job (so an abort reaches it). Updated only on the router's event loop."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pair:
    """The prefill and the decode worker (indices into the pool) one attempt of a job runs on."""

    prefill: int
    decode: int


@dataclass
class Books:
    outstanding: dict[tuple[str, int], int]
    """("p", i): prompt tokens prefill worker i is running or about to run; ("d", j): prompt
    plus max tokens of the jobs decode worker j holds."""
    prefilling: dict[int, int]
    """Prefill worker -> prompts it is running."""
    awaiting_kv: dict[int, int]
    """Decode worker -> prompt tokens reserved on it whose KV is not in yet."""
    counts: Counter[str] = field(default_factory=Counter)
    """Failures and retries seen by the request path, by reason."""
    jobs: dict[str, int] = field(default_factory=dict)
    """Job id -> the decode worker holding it."""

    @classmethod
    def empty(cls, num_prefill: int, num_decode: int) -> Books:
        outstanding = {("p", i): 0 for i in range(num_prefill)}
        outstanding.update({("d", j): 0 for j in range(num_decode)})
        return cls(
            outstanding, {i: 0 for i in range(num_prefill)}, {j: 0 for j in range(num_decode)}
        )

    def load(self, pair: Pair) -> tuple[int, int]:
        """The sort key of the pair choice: least loaded decode worker, then prefill worker."""
        return self.outstanding[("d", pair.decode)], self.outstanding[("p", pair.prefill)]

    @contextmanager
    def kv_pending(self, decode: int, tokens: int) -> Iterator[None]:
        """Count `tokens` as awaiting their KV on decode worker `decode` for the block (prefill
        and admission: until the decode worker holds every layer, or the attempt failed)."""
        self.awaiting_kv[decode] += tokens
        try:
            yield
        finally:
            self.awaiting_kv[decode] -= tokens
