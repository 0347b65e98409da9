"""Prefix affinity: which pair a request tries first when several decode workers could take it.

A decode worker whose prefix cache holds the leading pages of a prompt (an earlier turn of the
same conversation, a shared system prompt) needs only the pages after them: fewer bytes on the
link and no second copy of those pages in another pool. So before reserving, the backend asks
every healthy decode worker how many leading full pages of the prompt it holds now
(`DecodeWorker.cached_prefix_pages`: a hash lookup, nothing taken), and `order_pairs` puts first
the pairs whose decode worker holds the most, among those whose load is within `slack_tokens`
of the least loaded decode worker's (load: prompt + max tokens of the requests it holds, as
`Books.load` counts it); past that, load decides as without affinity. Ties (and a prompt nobody
holds) keep the least-loaded order. A worker that does not answer within `ASK_TIMEOUT_S` counts
as holding nothing; the reservation itself says what was really held.
"""

from __future__ import annotations

import asyncio

import ray

from zipserve.control.books import Books, Pair

ASK_TIMEOUT_S = 1.0


async def held_prefixes(decode_actors: dict[int, object], prompt_ids: list[int]) -> dict[int, int]:
    """decode worker index -> leading full pages of the prompt its prefix cache holds now."""

    async def ask(actor) -> int:
        try:
            return int(
                await asyncio.wait_for(actor.cached_prefix_pages.remote(prompt_ids), ASK_TIMEOUT_S)
            )
        except (ray.exceptions.RayError, asyncio.TimeoutError):
            return 0

    indices = list(decode_actors)
    answers = await asyncio.gather(*(ask(decode_actors[j]) for j in indices))
    return dict(zip(indices, answers))


def order_pairs(
    pairs: list[Pair], books: Books, held: dict[int, int], slack_tokens: int
) -> list[Pair]:
    """pairs with the decode workers holding the longest prefix first (within slack_tokens of
    the least loaded decode worker), then least loaded first."""
    if not pairs:
        return pairs
    least = min(books.outstanding[("d", p.decode)] for p in pairs)

    def key(p: Pair) -> tuple:
        within = books.outstanding[("d", p.decode)] - least <= slack_tokens
        return (-(held.get(p.decode, 0) if within else 0), books.load(p))

    return sorted(pairs, key=key)
