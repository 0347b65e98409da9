"""How a prefill group divides one prompt: query/KV heads per rank (GQA rules) and page-aligned
token slices. Unsupported splits are refused with a message naming the numbers.

Head rule (N ranks, H query heads, KVH kv heads, H % KVH == 0):
- H % N must be 0 (each rank attends to H/N query heads over the whole sequence);
- KVH % N == 0: rank j gets kv heads [j*KVH/N, (j+1)*KVH/N), exactly those its query heads use;
- else N % KVH == 0: each kv head is replicated to N/KVH ranks; rank j gets kv head
  j // (N/KVH) (its H/N query heads all belong to that head's group);
- anything else is refused (a rank's query heads would straddle kv-head groups unevenly).
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedSplit(ValueError):
    """A group size the model's heads (or the prompt's length) cannot be split over."""


@dataclass(frozen=True)
class HeadSplit:
    n: int
    num_heads: int
    num_kv_heads: int
    q_per_rank: int
    kv_per_rank: int
    kv_replicas: int
    """Ranks that hold a copy of each kv head (1 when KVH % N == 0)."""

    def q_heads(self, rank: int) -> slice:
        return slice(rank * self.q_per_rank, (rank + 1) * self.q_per_rank)

    def kv_heads(self, rank: int) -> slice:
        first = (rank // self.kv_replicas) * self.kv_per_rank
        return slice(first, first + self.kv_per_rank)


def plan_heads(num_heads: int, num_kv_heads: int, n: int) -> HeadSplit:
    if n < 1:
        raise UnsupportedSplit(f"prefill group: size must be >= 1, got {n}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise UnsupportedSplit(
            f"prefill group: {num_heads} query heads are not a multiple of {num_kv_heads} kv heads"
        )
    if num_heads % n:
        raise UnsupportedSplit(
            f"prefill group: {n} workers cannot split {num_heads} query heads evenly "
            f"(the group size must divide the number of query heads)"
        )
    if num_kv_heads % n == 0:
        return HeadSplit(n, num_heads, num_kv_heads, num_heads // n, num_kv_heads // n, 1)
    if n % num_kv_heads == 0:
        return HeadSplit(n, num_heads, num_kv_heads, num_heads // n, 1, n // num_kv_heads)
    raise UnsupportedSplit(
        f"prefill group: {n} workers and {num_kv_heads} kv heads: the group size must divide "
        f"the kv heads or be a multiple of them (kv heads replicated); {n} is neither"
    )


@dataclass(frozen=True)
class TokenSlice:
    rank: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def token_slices(num_tokens: int, n: int, page_size: int) -> list[TokenSlice]:
    """Contiguous slices, whole pages each except the last rank's tail; pages spread evenly
    (earlier ranks take the extra page). Every rank gets at least one token."""
    pages = -(-num_tokens // page_size)
    if pages < n:
        raise UnsupportedSplit(
            f"prefill group: a prompt of {num_tokens} tokens has {pages} pages of {page_size}; "
            f"{n} workers need at least {n} pages ({(n - 1) * page_size + 1} tokens)"
        )
    out, start = [], 0
    for r in range(n):
        take = pages // n + (1 if r < pages % n else 0)
        end = min(start + take * page_size, num_tokens)
        out.append(TokenSlice(r, start, end))
        start = end
    return out
