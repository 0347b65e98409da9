"""Automatic prefix caching: full KV pages found again by the tokens they hold and all before them.

Each full page of a sequence is named by a chained hash, sha256(the hash of the page before it,
the page's token ids), so a hash names the page's tokens and every token before them (as vLLM's
block hashes and SGLang's radix tree do). Once a page's KV is completely written (a prefill chunk
that covers it has run; see `register`) the cache maps its hash to its page id and the pool marks
the page cached (engine/page_pool.py): reference-counted, shared by every sequence whose prompt
starts with the same tokens, and when nobody holds it, free but reusable until the pool evicts it
(least recently released first, only when empty pages run out). A page still being written is
never in the map, so no sequence can read it.

Pages are cached in the pool's own form, never re-encoded: dense pages (bf16), a codec's
dequantized values (decode_kv=dense: its sinks are 16-bit inside page 0), or a compressed codec's
encoded pages. What a sequence keeps outside its pages is carried with the first page of a chain:
the compressed cache's 16-bit sinks (the first n_sink tokens; `PagedKVCache.prefix_state`), saved
when that page is registered and written into the slot of every sequence that reuses it. The open
page never needs it: cached pages are full, and the uncached suffix writes its own open page.

A sequence admitted with a cached prefix (`match`, at least one prompt token left to compute, so
there are logits to sample) prefills only the rest, as a chunked prefill whose past is the cached
pages (the caches' ordinary chunked-prefill path). What that gives, by cache:
- exact pages (bf16, `scores_by_page` False): the suffix attends to the prefix's exact K/V, so
  outputs equal caching off. Pages filled by decode are registered too (at finish or preemption:
  a preempted sequence recomputes only past its cached pages; a follow-up turn reuses them).
- a lossy codec (compressed pages, or their values in dense pages): the suffix attends to the
  prefix as the codec holds it, exactly what a prefill chunked at the same page boundary and every
  decode step read. Outputs equal caching off with the prompt prefilled in those chunks; against
  a whole-prompt prefill (where the prompt attends to itself exactly) they differ by the codec's
  error on the suffix's attention to the prefix, so a prompt's output can depend on what is
  cached. Only pages a prefill computed are registered (decode writes a codec's pages from other
  values than a prefill would: sealed from the 16-bit open page, or kept 16-bit in dense mode).
LCKV models are not cached (LLMEngine says why): their prompt encoding iterates over the whole
prompt, so a cached prefix would change how the suffix is encoded.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from zipserve.engine.page_pool import PagePool

if TYPE_CHECKING:
    from zipserve.engine.paged_cache import PagedKVCache
    from zipserve.engine.sequence import Sequence


@dataclass
class PrefixCacheStats:
    """Counters since the engine started (admissions after a preemption count again)."""

    lookups: int = 0
    """Admissions that looked their tokens up."""
    lookup_tokens: int = 0
    """Tokens those admissions had to prefill without the cache."""
    hits: int = 0
    """Admissions that reused at least one cached page."""
    hit_tokens: int = 0
    """Tokens whose KV came from cached pages instead of being computed."""
    evictions: int = 0
    """Cached pages evicted to make room."""
    cached_pages: int = 0
    """Pages the cache maps now (held by sequences or free but reusable)."""

    @property
    def hit_rate(self) -> float:
        """hit_tokens / lookup_tokens (0 before the first lookup)."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


def worker_cache_fields(stats: PrefixCacheStats | None) -> dict[str, int]:
    """What a worker reports of its engine's prefix cache (control/messages.py WorkerStats'
    cached_pages, cache_lookup_tokens, cache_hit_tokens; zeros without a prefix cache)."""
    if stats is None:
        return {"cached_pages": 0, "cache_lookup_tokens": 0, "cache_hit_tokens": 0}
    return {
        "cached_pages": stats.cached_pages,
        "cache_lookup_tokens": stats.lookup_tokens,
        "cache_hit_tokens": stats.hit_tokens,
    }


def page_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The chained hash of one full page: its tokens and (through parent) all before them."""
    h = hashlib.sha256(parent)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class PrefixCache:
    def __init__(
        self, pool: PagePool, page_size: int, kv: PagedKVCache, register_decoded: bool
    ) -> None:
        """kv: the engine's cache (its prefix_state / restore_prefix_state carry what a sequence
        keeps outside its pages); register_decoded: pages filled by decode steps are cached too
        (only where they hold what a prefill would: exact pages)."""
        self.pool, self.page_size, self.kv = pool, page_size, kv
        self.register_decoded = register_decoded
        self._page_of: dict[bytes, int] = {}  # hash -> page
        self._hash_of: dict[int, bytes] = {}  # page -> hash
        self._root_state: dict[int, object] = {}  # first page of a chain -> kv.prefix_state
        self._stats = PrefixCacheStats()
        # The pool calls back through a weak reference: a bound method would make pool and cache
        # a cycle, and the engine's KV memory (held by self.kv) would outlive the engine until
        # the next garbage collection (on a GPU, the next engine found no memory for its pool).
        this = weakref.ref(self)

        def forget(page: int) -> None:
            cache = this()
            if cache is not None:
                cache._forget(page)

        pool.on_evict = forget

    @property
    def stats(self) -> PrefixCacheStats:
        """A copy of the counters."""
        s = self._stats
        return PrefixCacheStats(
            s.lookups, s.lookup_tokens, s.hits, s.hit_tokens, s.evictions, len(self._page_of)
        )

    def _hashes(self, seq: Sequence, n_pages: int) -> list[bytes]:
        """The chained hashes of seq's first n_pages full pages (kept on seq, extended as needed)."""
        p, hashes = self.page_size, seq.page_hashes
        if len(hashes) < n_pages:
            ids = seq.all_ids
            for i in range(len(hashes), n_pages):
                hashes.append(page_hash(hashes[-1] if i else b"", ids[i * p : (i + 1) * p]))
        return hashes[:n_pages]

    def match(self, seq: Sequence) -> list[int]:
        """The cached pages of seq's longest cached prefix of full pages, leaving at least one
        token to compute. Takes nothing: the caller `pool.share`s them before allocating more."""
        pages = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.page_size):
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def admitted(self, seq: Sequence, hit: list[int]) -> None:
        """seq now holds `hit` as its first pages and a slot: it starts after them. Restores what
        the chain carries outside the pages into seq's slot, and counts the lookup."""
        tokens = len(hit) * self.page_size
        s = self._stats
        s.lookups += 1
        s.lookup_tokens += seq.num_tokens
        if hit:
            if seq.pages[: len(hit)] != hit:
                raise RuntimeError(f"sequence {seq.seq_id}: cached pages are not its first pages")
            state = self._root_state.get(hit[0])
            if state is not None:
                self.kv.restore_prefix_state(seq.slot, state)
            s.hits += 1
            s.hit_tokens += tokens
        seq.num_cached = tokens
        if seq.num_preemptions == 0:
            seq.cached_tokens = min(tokens, len(seq.prompt_ids))

    def register(self, seq: Sequence) -> None:
        """Cache seq's full pages among its num_cached tokens (their KV is written: call after
        the forward that wrote them). A page whose hash is already cached stays seq's own."""
        n = seq.num_cached // self.page_size
        for i, h in enumerate(self._hashes(seq, n)):
            if h in self._page_of:
                continue
            page = seq.pages[i]
            if self.pool.is_cached(page):
                raise RuntimeError(f"page {page} is cached under another hash")
            if i == 0:
                state = self.kv.prefix_state(seq.slot)
                if state is not None:
                    self._root_state[page] = state
            self._page_of[h], self._hash_of[page] = page, h
            self.pool.mark_cached(page)

    def release(self, seq: Sequence) -> None:
        """seq is about to give its pages back: with register_decoded, its pages filled by
        decode steps are cached first."""
        if self.register_decoded:
            self.register(seq)

    def _forget(self, page: int) -> None:
        """The pool evicts `page`: its hash no longer names anything."""
        del self._page_of[self._hash_of.pop(page)]
        self._root_state.pop(page, None)
        self._stats.evictions += 1
