"""Continuous batching: which sequences prefill or decode next, and who holds which pages.

Each step is either a packed prefill of waiting sequences (preferred, FIFO, bounded by free pages,
max_prefill_tokens and max_num_seqs) or one decode step of every running sequence. With
max_prefill_chunk, a longer prompt is prefilled a chunk per step (it holds its pages and slot
meanwhile and joins the running batch with its last chunk); those chunks go first. When a decode
step needs a page that is not free, the most recently admitted running sequence is preempted: its
pages go back to the pool and it waits to be recomputed. A sequence whose KV is written from
outside (a decode worker importing a prefill worker's layers) is `reserve`d: RESERVED, holding
pages and a slot (its leading pages possibly shared from the prefix cache), until `admit` makes
it RUNNING. Every path that ends a sequence frees its pages here, so the pool is whole whenever
nothing runs. With a prefix cache (engine/prefix_cache.py) a
waiting sequence is admitted holding references on its longest cached prefix of full pages and
prefills only the rest (a chunked prefill starting after them); released pages the cache maps stay
reusable in the pool until evicted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from zipserve.engine.page_pool import PagePool, pages_for
from zipserve.engine.prefix_cache import PrefixCache
from zipserve.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    chunk_ends: list[int] | None = None
    """Prefill: tokens of each sequence cached after this step (its num_tokens unless chunked)."""

    def completes(self, seq_index: int) -> bool:
        """Whether this step finishes the prefill of seqs[seq_index] (so it samples a token)."""
        return (
            self.chunk_ends is None or self.chunk_ends[seq_index] == self.seqs[seq_index].num_tokens
        )


class Scheduler:
    def __init__(
        self,
        pool: PagePool,
        page_size: int,
        max_num_seqs: int,
        max_prefill_tokens: int,
        max_prefill_chunk: int = 0,
        prefix_cache: PrefixCache | None = None,
    ):
        self.pool, self.page_size = pool, page_size
        self.prefix_cache = prefix_cache
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.max_prefill_chunk = max_prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Admitted sequences whose prompt is only partly prefilled (chunked prefill).
        self.prefilling: list[Sequence] = []
        # One open-page slot per running sequence (used by compressed caches).
        self.free_slots: list[int] = list(range(max_num_seqs - 1, -1, -1))
        # RESERVED sequences by seq_id: they hold pages and a slot while their KV is written.
        self.reserved: dict[int, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def reserve(self, seq: Sequence, num_tokens: int, hit: list[int] | None = None) -> bool:
        """Pages for num_tokens (+1 for the next token) and a slot, before the KV is written.
        `hit`: cached pages seq starts with (`PrefixCache.match`, counted as a lookup; None:
        the cache was not asked): shared, not allocated, and seq.num_cached starts after them
        (only the rest is written). False (nothing taken) when pages or slots are short."""
        looked_up, hit = hit is not None, hit or []
        if hit and self.prefix_cache is None:
            raise RuntimeError(f"sequence {seq.seq_id}: cached pages without a prefix cache")
        if self._num_admitted() >= self.max_num_seqs or not self.free_slots:
            return False
        self.pool.share(hit, seq.seq_id)  # first, so allocating cannot evict them
        pages = self.pool.allocate(pages_for(num_tokens + 1, self.page_size) - len(hit), seq.seq_id)
        if pages is None:
            self.pool.free(hit[::-1], seq.seq_id)
            return False
        seq.pages, seq.slot = hit + pages, self.free_slots.pop()
        seq.status = SeqStatus.RESERVED
        self.reserved[seq.seq_id] = seq
        if looked_up and self.prefix_cache is not None:
            self.prefix_cache.admitted(seq, hit)  # num_cached = the cached tokens
        return True

    def admit(self, seq: Sequence) -> None:
        """A reserved sequence whose KV has fully arrived joins the running batch."""
        if not seq.reserved:
            raise KeyError(f"sequence {seq.seq_id} is {seq.status.value}, not reserved")
        del self.reserved[seq.seq_id]
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def prefill_reserved(self, seq: Sequence) -> None:
        """A reserved sequence computes the rest of its prompt here instead of receiving it (a
        local prefill): it joins the prefills after its cached pages, chunked as any prompt."""
        if not seq.reserved:
            raise KeyError(f"sequence {seq.seq_id} is {seq.status.value}, not reserved")
        del self.reserved[seq.seq_id]
        seq.status = SeqStatus.RUNNING
        self.prefilling.append(seq)

    def _num_admitted(self) -> int:
        return len(self.running) + len(self.reserved) + len(self.prefilling)

    def _chunk(self, remaining: int) -> int:
        return min(remaining, self.max_prefill_chunk) if self.max_prefill_chunk else remaining

    def schedule(self) -> ScheduledBatch | None:
        prefill, ends = self._schedule_prefill()
        if prefill:
            return ScheduledBatch(prefill, is_prefill=True, chunk_ends=ends)
        decode = self._schedule_decode()
        return ScheduledBatch(decode, is_prefill=False) if decode else None

    def _schedule_prefill(self) -> tuple[list[Sequence], list[int]]:
        batch: list[Sequence] = []
        ends: list[int] = []
        tokens = 0
        # Next chunks of partly prefilled prompts first (their pages are already held).
        for seq in list(self.prefilling):
            n = self._chunk(seq.num_tokens - seq.num_cached)
            if batch and tokens + n > self.max_prefill_tokens:
                break
            batch.append(seq)
            ends.append(seq.num_cached + n)
            tokens += n
            if ends[-1] == seq.num_tokens:
                self.prefilling.remove(seq)
                self.running.append(seq)
        while self.waiting and self.free_slots and self._num_admitted() < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.prefix_cache.match(seq) if self.prefix_cache is not None else []
            start = len(hit) * self.page_size
            n = self._chunk(seq.num_tokens - start)
            if batch and tokens + n > self.max_prefill_tokens:
                break
            # References on the cached pages first (so allocating cannot evict them), then pages
            # for the rest of the prompt plus the first generated token's slot.
            self.pool.share(hit, seq.seq_id)
            pages = self.pool.allocate(
                pages_for(seq.num_tokens + 1, self.page_size) - len(hit), seq.seq_id
            )
            if pages is None:
                self.pool.free(hit[::-1], seq.seq_id)
                break
            self.waiting.popleft()
            seq.pages, seq.status = hit + pages, SeqStatus.RUNNING
            seq.slot = self.free_slots.pop()
            if self.prefix_cache is not None:
                self.prefix_cache.admitted(seq, hit)  # num_cached = start
            batch.append(seq)
            ends.append(start + n)
            tokens += n
            (self.running if start + n == seq.num_tokens else self.prefilling).append(seq)
        return batch, ends

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an earlier one
                continue
            need = pages_for(seq.num_cached + 1, self.page_size) - len(seq.pages)
            while need > 0:
                got = self.pool.allocate(need, seq.seq_id)
                if got is not None:
                    seq.pages.extend(got)
                    break
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                scheduled.append(seq)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        """Return seq's pages and queue it for recomputation ahead of new requests."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.reserved.pop(seq.seq_id, None)
        self._release(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def _release(self, seq: Sequence) -> None:
        if self.prefix_cache is not None and seq.status is SeqStatus.RUNNING:
            self.prefix_cache.release(seq)
        # Last page first: of a released chain the cache evicts the deepest pages first.
        self.pool.free(seq.pages[::-1], seq.seq_id)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
        seq.pages, seq.num_cached, seq.slot = [], 0, -1
