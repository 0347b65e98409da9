"""Page accounting: which KV pages are free, which sequence owns each used page.

The pool hands out page indices (never page 0, the scratch page). Running out is a refusal
(`allocate` returns None), never an exception the caller must guess at; freeing a page twice or
freeing a page one does not own is a bug and raises.
"""

from __future__ import annotations

from zipserve.engine.kv_cache import SCRATCH_PAGE


class PagePool:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(
                f"num_pages: need at least 2 (one is the scratch page), got {num_pages}"
            )
        self.num_pages = num_pages
        # Stack of free pages; pop from the end so low pages are handed out first.
        self._free: list[int] = [p for p in range(num_pages - 1, -1, -1) if p != SCRATCH_PAGE]
        self._owner: dict[int, int] = {}  # page -> owning sequence id

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owner)

    def allocate(self, n: int, owner: int) -> list[int] | None:
        """n pages for `owner`, or None (nothing taken) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"n: cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._owner[p] = owner
        return pages

    def free(self, pages: list[int], owner: int) -> None:
        for p in pages:
            got = self._owner.get(p)
            if got != owner:
                raise RuntimeError(f"page {p} freed by sequence {owner} but owned by {got}")
        for p in pages:
            del self._owner[p]
            self._free.append(p)

    def owners(self) -> dict[int, int]:
        """Copy of page -> owner for pages in use (for leak reports)."""
        return dict(self._owner)


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold num_tokens tokens."""
    return -(-num_tokens // page_size)
