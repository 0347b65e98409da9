"""Page accounting: which KV pages are free, which sequences hold each page, which free pages
still hold a cached prefix.

The pool hands out page indices (never page 0, the scratch page). Running out is a refusal
(`allocate` returns None), never an exception the caller must guess at; freeing a page twice or
freeing a page one does not hold is a bug and raises.

A page is held by one sequence (`allocate`) or, once it holds a cached prefix page
(`mark_cached`, engine/prefix_cache.py), by any number of them (`share`): its reference count is
the number of holders. A cached page that nobody holds is free but reusable: it counts as free,
stays out of the empty-page stack and is evicted, least recently released first, only when
`allocate` runs out of empty pages (`on_evict` tells the prefix cache to forget it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from zipserve.engine.kv_cache import SCRATCH_PAGE


class PagePool:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(
                f"num_pages: need at least 2 (one is the scratch page), got {num_pages}"
            )
        self.num_pages = num_pages
        # Stack of empty pages; pop from the end so low pages are handed out first.
        self._free: list[int] = [p for p in range(num_pages - 1, -1, -1) if p != SCRATCH_PAGE]
        self._holders: dict[int, list[int]] = {}  # page -> sequence ids holding it
        self._cached: set[int] = set()  # pages whose content the prefix cache maps (held or not)
        # Cached pages no sequence holds, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.on_evict: Callable[[int], None] | None = None
        """Called with a cached page as it is evicted (before it is handed out again)."""
        self.num_evicted = 0

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: empty ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages held by at least one sequence."""
        return len(self._holders)

    @property
    def num_cached_free(self) -> int:
        """Free pages that still hold a cached prefix (evicted only when empty ones run out)."""
        return len(self._evictable)

    def refcount(self, page: int) -> int:
        return len(self._holders.get(page, ()))

    def allocate(self, n: int, owner: int) -> list[int] | None:
        """n pages for `owner` alone, or None (nothing taken) when fewer than n are free. Empty
        pages first, then cached pages nobody holds, least recently released first."""
        if n < 0:
            raise ValueError(f"n: cannot allocate a negative number of pages ({n})")
        if n > self.num_free:
            return None
        pages = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(pages) < n:
            page, _ = self._evictable.popitem(last=False)
            self._cached.discard(page)
            self.num_evicted += 1
            if self.on_evict is not None:
                self.on_evict(page)
            pages.append(page)
        for p in pages:
            self._holders[p] = [owner]
        return pages

    def share(self, pages: list[int], owner: int) -> None:
        """`owner` takes a reference on each of these cached pages (held or free)."""
        for p in pages:
            if p not in self._cached:
                raise RuntimeError(
                    f"page {p} shared by sequence {owner} but holds no cached prefix"
                )
            if owner in self._holders.get(p, ()):
                raise RuntimeError(f"page {p} shared twice by sequence {owner}")
        for p in pages:
            self._evictable.pop(p, None)
            self._holders.setdefault(p, []).append(owner)

    def mark_cached(self, page: int) -> None:
        """The page (held, fully written) now holds a cached prefix page: when its last holder
        frees it, it stays reusable until evicted."""
        if page not in self._holders:
            raise RuntimeError(f"page {page} marked cached but no sequence holds it")
        self._cached.add(page)

    def is_cached(self, page: int) -> bool:
        return page in self._cached

    def free(self, pages: list[int], owner: int) -> None:
        """Drop owner's reference on each page, in order: a page nobody holds any more goes back
        empty, or, when cached, to the end of the eviction order (freed first, evicted first)."""
        for p in pages:
            holders = self._holders.get(p, ())
            if owner not in holders:
                raise RuntimeError(f"page {p} freed by sequence {owner} but held by {holders}")
        if len(set(pages)) != len(pages):
            raise RuntimeError(f"sequence {owner} frees a page twice: {pages}")
        for p in pages:
            holders = self._holders[p]
            holders.remove(owner)
            if holders:
                continue
            del self._holders[p]
            if p in self._cached:
                self._evictable[p] = None
            else:
                self._free.append(p)

    def owners(self) -> dict[int, tuple[int, ...]]:
        """Copy of page -> holding sequence ids for pages in use (for leak reports)."""
        return {p: tuple(h) for p, h in self._holders.items()}


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold num_tokens tokens."""
    return -(-num_tokens // page_size)
