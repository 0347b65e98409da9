"""The router's TokenFeed (one poll per decode worker for all its jobs) against a fake worker,
and DecodeWorker.poll_many against a real one on the CPU."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from disagg_helpers import serve_one, shutdown_pair, worker_pair

from zipserve.control.messages import FeedReply, PollReply
from zipserve.control.token_feed import TokenFeed
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.sampling_params import SamplingParams


def _reply(tokens, finished=False):
    return PollReply(list(tokens), [], [], "", finished, "length" if finished else None, None, {})


class _FakeWorker:
    """poll_many over a dict of token lists: answers at once with whatever is new (a real
    worker waits for news; the feed must work either way)."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.asked: list[dict[str, int]] = []
        self.fail: Exception | None = None

    async def poll_many(self, since, seen, timeout):
        self.asked.append(dict(since))
        await asyncio.sleep(0.001)
        if self.fail is not None:
            raise self.fail
        news = {r: n for r, n in since.items() if len(self.tokens[r]) > n}
        return FeedReply(seen + 1, {r: _reply(self.tokens[r][n:]) for r, n in news.items()})


def test_one_call_serves_every_job_waiting_on_the_worker():
    async def main():
        w = _FakeWorker()
        w.tokens = {"a": [1, 2], "b": [7], "c": []}
        feed = TokenFeed(w.poll_many)
        got = await asyncio.gather(feed.next("a", 1), feed.next("b", 0))
        with pytest.raises(RuntimeError, match="already waiting"):
            await asyncio.gather(feed.next("c", 0), feed.next("c", 0))
        return w, feed, got

    w, feed, (a, b) = asyncio.run(main())
    assert a.tokens == [2] and b.tokens == [7]
    assert w.asked[0] == {"a": 1, "b": 0}  # both in one call


def test_a_failed_call_fails_every_waiting_job_and_the_next_call_starts_afresh():
    async def main():
        w = _FakeWorker()
        w.tokens = {"a": [], "b": []}
        w.fail = RuntimeError("worker died")
        feed = TokenFeed(w.poll_many)
        results = await asyncio.gather(feed.next("a", 0), feed.next("b", 0), return_exceptions=True)
        w.fail, w.tokens["a"] = None, [5]
        return results, await feed.next("a", 0)

    results, later = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "worker died" in str(r) for r in results)
    assert later.tokens == [5]


def test_a_cancelled_job_is_no_longer_asked_about():
    async def main():
        w = _FakeWorker()
        w.tokens = {"a": [], "b": []}
        feed = TokenFeed(w.poll_many)
        task = asyncio.create_task(feed.next("a", 0))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        w.asked.clear()
        w.tokens["b"] = [3]
        return w, await feed.next("b", 0)

    w, b = asyncio.run(main())
    assert b.tokens == [3] and all("a" not in s for s in w.asked)


needs_model = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)


@needs_model
def test_poll_many_answers_news_progress_unknown_requests_and_timeouts():
    pre, dec, _ = worker_pair(str(REFERENCE_MODEL), "bf16")
    try:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        rep, res = serve_one(pre, dec, "r0", list(range(3, 60)), params)
        assert res.finished
        got = dec.poll_many({"r0": 0, "gone": 0}, seen=-1, timeout=0)
        assert got.replies["r0"].tokens == res.tokens and got.replies["r0"].finished
        assert (
            got.replies["gone"].finished
            and "not on this decode worker" in got.replies["gone"].error
        )
        t0 = time.time()  # nothing new, progress as seen: waits the timeout out
        idle = dec.poll_many({}, seen=got.progress, timeout=0.2)
        assert idle.replies == {} and idle.progress == got.progress and time.time() - t0 >= 0.2
        # a state change anywhere (a release) wakes a waiting poll_many at once
        woke: list[FeedReply] = []
        waiter = threading.Thread(
            target=lambda: woke.append(dec.poll_many({}, seen=got.progress, timeout=5))
        )
        waiter.start()
        time.sleep(0.1)
        t0 = time.time()
        dec.release("r0")
        waiter.join(timeout=5)
        assert woke and woke[0].progress > got.progress and time.time() - t0 < 1
    finally:
        shutdown_pair(pre, dec)


def test_a_feed_used_from_a_new_event_loop_starts_afresh():
    """A feed whose first loop ended with a call in flight (its task never finishes there)
    still answers in the next loop."""
    w = _FakeWorker()
    w.tokens = {"a": [], "b": [4]}
    feed = TokenFeed(w.poll_many)

    async def abandon():
        asyncio.ensure_future(feed.next("a", 0))  # never answered: "a" has no tokens
        await asyncio.sleep(0.01)

    asyncio.run(abandon())
    assert asyncio.run(asyncio.wait_for(feed.next("b", 0), 2)).tokens == [4]
