"""`TokenFeed`: the router's one long poll per decode worker, for all of that worker's jobs.

Each job streaming from a decode worker used to hold its own long poll (`DecodeWorker.poll`): a
decode step that produced a token for each of N running requests woke N polls, and each came
back through Ray and went out again, N calls per step into the worker's Python (under its lock
and the GIL, beside the step loop, the receive thread and the give-backs). Here a job asks the
feed (`next(request_id, since)`), and the feed asks the worker once for every job waiting on it
(`DecodeWorker.poll_many`), at most one call in flight. The worker answers as soon as its
progress moves (any request's state changed) or a job asked about has news, so a job that joins
while a call is in flight waits at most until the next decode step; the feed then asks again
right away, with everyone waiting by then.

A failed call (the worker died) fails every job waiting on it with the call's exception, as
each job's own poll would have.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from zipserve.control.messages import FeedReply, PollReply

FEED_ENV = "ZIPSERVE_TOKEN_FEED"
"""'0': every job polls its decode worker itself (the old way, for A/B runs)."""
POLL_S = 1.0
"""How long one call may wait at the worker for news."""


def feed_enabled() -> bool:
    return os.environ.get(FEED_ENV, "1") != "0"


class TokenFeed:
    def __init__(
        self, poll_many: Callable[[dict[str, int], int, float], Awaitable[FeedReply]]
    ) -> None:
        """poll_many: the decode worker's poll_many as an awaitable call (a Ray actor's
        `lambda *a: actor.poll_many.remote(*a)`)."""
        self._poll_many = poll_many
        self._waiting: dict[str, tuple[int, asyncio.Future[PollReply]]] = {}
        self._seen = -1
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def next(self, request_id: str, since: int) -> PollReply:
        """The job's tokens from index `since` on (or its end), once there are any. One call at a
        time per job (RuntimeError for a second while the first waits)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (a test's asyncio.run): start afresh
            self._loop, self._waiting, self._task = loop, {}, None
        if request_id in self._waiting:
            raise RuntimeError(f"job {request_id!r} is already waiting on this feed")
        fut: asyncio.Future[PollReply] = loop.create_future()
        self._waiting[request_id] = (since, fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        try:
            return await fut
        finally:
            if self._waiting.get(request_id, (0, None))[1] is fut:  # cancelled: forget it
                del self._waiting[request_id]

    async def _run(self) -> None:
        while self._waiting:
            since = {rid: n for rid, (n, _) in self._waiting.items()}
            try:
                got = await self._poll_many(since, self._seen, POLL_S)
            except Exception as e:  # every job waiting on this worker sees the failure
                waiting, self._waiting = self._waiting, {}
                for _, fut in waiting.values():
                    if not fut.done():
                        fut.set_exception(e)
                return
            self._seen = got.progress
            for rid, reply in got.replies.items():
                since_now, fut = self._waiting.get(rid, (None, None))
                if fut is not None and since_now == since[rid] and not fut.done():
                    del self._waiting[rid]
                    fut.set_result(reply)
            await asyncio.sleep(0)  # let the jobs just answered ask again before the next call
