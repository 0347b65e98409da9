"""control/lifecycle.py without Ray: a job walks reserve -> prefill -> transfer -> admit -> decode
over fake workers, its phases tile its time, a worker that dies before the first token sends the
job to another pair, and the per-worker books are back to zero after every job."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import ray

from zipserve.control.books import Books
from zipserve.control.lifecycle import Lifecycle
from zipserve.control.messages import DecodeStats, FeedReply, PollReply, Reservation
from zipserve.control.worker_pool import WorkerSlot
from zipserve.prefill_worker.worker import PrefillReport
from zipserve.router.backend import FinishEvent, Job, PhaseEvent, TokenEvent


class _Call:
    """actor.method.remote(...) -> an awaitable with the method's result (or its exception)."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        fut = asyncio.get_running_loop().create_future()
        try:
            fut.set_result(self.fn(*args))
        except Exception as e:  # noqa: BLE001 - delivered to the awaiting stage
            fut.set_exception(e)
        return fut


class _Prefill:
    def __init__(self, dies: bool = False):
        self.dies = dies
        self.prefill = _Call(self._prefill)
        self.first_pages: list[int] = []

    def _prefill(self, rid, prompt, params, decode_id, first_page):
        if self.dies:
            raise ray.exceptions.RayActorError()
        self.first_pages.append(first_page)
        return PrefillReport(
            rid,
            7,
            None,
            10.0,
            10.5,
            10.6,
            1000,
            4000,
            cached_tokens=32 if first_page else 0,
            bytes_not_sent=200 * first_page,
            first_page=first_page,
        )


class _Decode:
    def __init__(self, held_pages: int = 0):
        self.held: set[str] = set()
        self.held_pages = held_pages
        self.reserve = _Call(self._reserve)
        self.release = _Call(lambda rid: self.held.discard(rid))
        self.admit = _Call(
            lambda rid, tok, lp, timeout, top: PollReply(
                [tok],
                [],
                [],
                "a",
                False,
                None,
                None,
                {"reserved": 9.9, "kv_complete": 10.7, "admitted": 10.8},
            )
        )
        self.poll = _Call(
            lambda rid, since, timeout: PollReply(
                [8],
                [],
                [],
                "ab",
                True,
                "length",
                None,
                {"kv_complete": 10.7, "admitted": 10.8, "finished": 11.0},
            )
        )

        self.poll_many = _Call(  # the router's token feed asks this way (control/token_feed.py)
            lambda since, seen, timeout: FeedReply(
                seen + 1, {rid: self.poll.fn(rid, n, timeout) for rid, n in since.items()}
            )
        )

    def _reserve(self, rid, prompt, params, deadline):
        self.held.add(rid)
        return Reservation(self.held_pages, 16)


def _stats() -> DecodeStats:
    return DecodeStats(
        free_pages=10, used_pages=0, capacity_pages=10, running=0, codec="bf16", incarnation="i"
    )


class _Pool:
    def __init__(self, prefill_actors, held_pages: int = 0):
        self.prefill = [WorkerSlot("prefill", i, a, True) for i, a in enumerate(prefill_actors)]
        self.decode = [WorkerSlot("decode", 0, _Decode(held_pages), True, "i", _stats())]
        self.suspected: list[str] = []

    def usable_pairs(self):
        return [(w.index, 0) for w in self.prefill if w.healthy]

    def suspect(self, w, error):
        w.healthy = False
        self.suspected.append(w.name)

    def all_dead(self, role):
        return False


def _run(pool, books, local: int = 0) -> list:
    cfg = SimpleNamespace(
        codec="bf16",
        page_wait_s=5.0,
        retries=1,
        transfer_deadline_s=5.0,
        group=None,
        local_prefill_tokens=local,
    )
    life = Lifecycle(cfg, pool, books, page_size=16, kv_bytes_per_token_bf16=100)
    job = Job("j1", list(range(3, 40)), max_tokens=2, arrival=9.8)

    async def collect():
        return [ev async for ev in life.run(job)]

    return asyncio.run(collect())


def test_a_short_rest_is_prefilled_on_the_decode_worker():
    """Held 2 of 16-token pages of a 37-token prompt: 5 tokens left, within local_prefill_tokens:
    no prefill worker runs, nothing is sent, the phases still tile the job."""
    prefill = _Prefill()
    pool, books = _Pool([prefill], held_pages=2), Books.empty(1, 1)
    dec = pool.decode[0].actor
    dec.prefill_local = _Call(
        lambda rid, timeout: PollReply(
            [7],
            [],
            [],
            "a",
            False,
            None,
            None,
            {"local_prefill": 10.1, "kv_complete": 10.1, "admitted": 10.1, "first_token": 10.3},
        )
    )
    events = _run(pool, books, local=5)
    assert prefill.first_pages == []  # the prefill worker never ran
    phases = [(e.name, e.start, e.end) for e in events if isinstance(e, PhaseEvent)]
    assert phases[:4] == [
        ("queue", 9.8, 10.1),
        ("prefill", 10.1, 10.3),
        ("transfer", 10.3, 10.3),
        ("decode_queue", 10.3, 10.3),
    ]
    fin = events[-1]
    assert fin.local_prefill and fin.kv_bytes == fin.kv_bytes_bf16 == 0
    assert (fin.cached_tokens, fin.kv_cached_tokens) == (32, 32)
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == [7, 8]
    _whole(books, pool)
    pool, books = _Pool([prefill], held_pages=2), Books.empty(1, 1)
    assert not _run(pool, books, local=4)[-1].local_prefill  # 5 left: past the threshold
    assert prefill.first_pages == [2]


def _whole(books: Books, pool) -> None:
    assert set(books.outstanding.values()) == {0} and set(books.awaiting_kv.values()) == {0}
    assert set(books.prefilling.values()) == {0} and not books.jobs
    assert not pool.decode[0].actor.held  # released


def test_one_job_walks_every_stage():
    pool, books = _Pool([_Prefill()]), Books.empty(1, 1)
    events = _run(pool, books)
    phases = [(e.name, e.start, e.end) for e in events if isinstance(e, PhaseEvent)]
    assert phases == [
        ("queue", 9.8, 10.0),
        ("prefill", 10.0, 10.5),
        ("transfer", 10.5, 10.7),
        ("decode_queue", 10.7, 10.8),
        ("decode", 10.8, None),
    ]
    assert [(e.token_id, e.text) for e in events if isinstance(e, TokenEvent)] == [
        (7, "a"),
        (8, "b"),
    ]
    assert events[-1] == FinishEvent(
        "length",
        codec="bf16",
        kv_bytes=1000,
        kv_bytes_bf16=37 * 100,
        cached_tokens=0,
        kv_bytes_not_sent=0,
        kv_cached_tokens=0,
        kv_sent_end=10.6,  # the prefill side's report: its last layer left then
    )
    _whole(books, pool)


def test_pages_the_decode_worker_holds_are_not_sent():
    """The reservation's held pages go to the prefill worker as first_page; the finish reports
    the prefill side's cached tokens, the decode side's held tokens and the bytes not sent, and
    counts bf16 bytes only for the tokens sent."""
    prefill = _Prefill()
    pool, books = _Pool([prefill], held_pages=2), Books.empty(1, 1)
    fin = _run(pool, books)[-1]
    assert prefill.first_pages == [2]
    assert (fin.cached_tokens, fin.kv_cached_tokens, fin.kv_bytes_not_sent) == (32, 32, 400)
    assert fin.kv_bytes_bf16 == (37 - 2 * 16) * 100
    _whole(books, pool)


def test_a_prefill_worker_dying_sends_the_job_to_another_pair():
    pool, books = _Pool([_Prefill(dies=True), _Prefill()]), Books.empty(2, 1)
    events = _run(pool, books)
    assert events[-1].reason == "length" and pool.suspected == ["prefill-0"]
    assert books.counts == {"prefill_worker_died": 1, "retried": 1}
    _whole(books, pool)  # the failed attempt's reserved tokens no longer count as awaiting KV
