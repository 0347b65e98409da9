"""Prefix affinity (control/affinity.py) with several decode workers: a request goes to the decode
worker that holds the longest prefix of its prompt unless that worker is more than the slack
more loaded than the least loaded; a worker that does not answer counts as holding nothing; and
the held pages reach the prefill worker as first_page. Without Ray (fake actors, as
tests/test_lifecycle.py), plus one run of the real stack with two decode workers on the CPU."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from types import SimpleNamespace

import pytest
import ray
from test_lifecycle import _Call, _Decode, _Prefill, _stats

from zipserve.control.affinity import held_prefixes, order_pairs
from zipserve.control.books import Books, Pair
from zipserve.control.lifecycle import Lifecycle
from zipserve.control.worker_pool import WorkerSlot
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.router.backend import Job


def test_longest_prefix_first_within_the_slack():
    books = Books.empty(1, 3)
    pairs = [Pair(0, j) for j in range(3)]
    assert order_pairs(pairs, books, {0: 0, 1: 2, 2: 5}, 100) == [
        Pair(0, 2),
        Pair(0, 1),
        Pair(0, 0),
    ]
    books.outstanding[("d", 2)] = 101  # past the slack: it competes on load alone
    assert order_pairs(pairs, books, {0: 0, 1: 2, 2: 5}, 100) == [
        Pair(0, 1),
        Pair(0, 0),
        Pair(0, 2),
    ]
    books.outstanding[("d", 1)] = 50  # equal prefixes: least loaded first
    assert order_pairs(pairs, books, {0: 2, 1: 2, 2: 0}, 100) == [
        Pair(0, 0),
        Pair(0, 1),
        Pair(0, 2),
    ]


class _HoldingDecode(_Decode):
    def __init__(self, holds: int, dies: bool = False):
        super().__init__(held_pages=holds)
        self.asked = 0

        def ask(prompt):
            self.asked += 1
            if dies:
                raise ray.exceptions.RayActorError()
            return holds

        self.cached_prefix_pages = _Call(ask)


class _Pool:
    def __init__(self, decodes):
        self.prefill = [WorkerSlot("prefill", 0, _Prefill(), True)]
        self.decode = [
            WorkerSlot("decode", j, d, True, "i", _stats()) for j, d in enumerate(decodes)
        ]

    def usable_pairs(self):
        return [(0, w.index) for w in self.decode if w.healthy]

    def suspect(self, w, error):
        w.healthy = False

    def all_dead(self, role):
        return False


def _run(pool, books, affinity: bool = True, slack: int = 4096):
    cfg = SimpleNamespace(
        codec="bf16",
        page_wait_s=5.0,
        retries=0,
        transfer_deadline_s=5.0,
        group=None,
        prefix_affinity=affinity,
        affinity_slack_tokens=slack,
        local_prefill_tokens=0,
    )
    life = Lifecycle(cfg, pool, books, page_size=16, kv_bytes_per_token_bf16=100)
    job = Job("j1", list(range(3, 70)), max_tokens=2, arrival=9.8)

    async def collect():
        return [ev async for ev in life.run(job)]

    return asyncio.run(collect())


@pytest.mark.parametrize("affinity", [True, False])
def test_the_job_goes_to_the_decode_worker_holding_its_prefix(affinity):
    decodes = [_HoldingDecode(0), _HoldingDecode(3)]
    pool, books = _Pool(decodes), Books.empty(1, 2)
    fin = _run(pool, books, affinity)[-1]
    want = 1 if affinity else 0  # without affinity: the least loaded, the first on a tie
    assert fin.reason == "length" and fin.kv_cached_tokens == (48 if affinity else 0)
    assert pool.prefill[0].actor.first_pages == [3 if affinity else 0]
    assert [d.asked for d in decodes] == ([1, 1] if affinity else [0, 0])
    assert not decodes[1 - want].held and not decodes[want].held  # reserved, then released
    assert set(books.outstanding.values()) == {0}


def test_a_busier_holder_past_the_slack_loses_and_a_silent_one_holds_nothing():
    decodes = [_HoldingDecode(0), _HoldingDecode(3)]
    pool, books = _Pool(decodes), Books.empty(1, 2)
    books.outstanding[("d", 1)] = 5000  # another job's load
    assert _run(pool, books, slack=4096)[-1].kv_cached_tokens == 0
    books.outstanding[("d", 1)] = 0
    decodes = [_HoldingDecode(0), _HoldingDecode(3, dies=True)]
    held = asyncio.run(held_prefixes({j: d for j, d in enumerate(decodes)}, [1, 2, 3]))
    assert held == {0: 0, 1: 0}


@pytest.mark.slow
@pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
def test_two_decode_workers_on_the_cpu_keep_a_conversation_on_one(local_ray):
    """A long job keeps decode-0 busy, so turn 1 of a conversation lands on decode-1; once
    both are idle, turn 2 (turn 1's prompt + answer + more) goes to decode-1 again, which
    holds turn 1's pages: only the rest is sent."""
    import threading

    from net_helpers import post_json

    from zipserve.control.config import ServeConfig
    from zipserve.deploy.serve import running_server

    cfg = ServeConfig(
        model=str(REFERENCE_MODEL),
        codec="bf16",
        num_decode=2,
        skip_tokenizer=True,
        local_prefill_tokens=0,  # turn 2 receives the pages it lacks (not prefilled locally)
    )
    with running_server(cfg, "127.0.0.1", 0) as (base, backend):
        url = f"{base}/v1/completions"
        body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
        long_job = threading.Thread(
            target=post_json,
            args=(url, {**body, "prompt": list(range(10, 60)), "max_tokens": 600}),
        )
        long_job.start()
        deadline = time.time() + 30
        while backend.books.outstanding[("d", 0)] == 0:  # decode-0 holds the long job
            assert time.time() < deadline
            time.sleep(0.01)
        turn1 = list(range(100, 300))
        out1 = post_json(url, {**body, "prompt": turn1})
        long_job.join(120)
        turn2 = turn1 + out1["choices"][0]["token_ids"] + list(range(400, 440))
        out2 = post_json(url, {**body, "prompt": turn2})
        jobs = [
            json.loads(urllib.request.urlopen(f"{base}/v1/jobs/{o['id']}").read())
            for o in (out1, out2)
        ]
        assert jobs[0]["kv_cached_tokens"] == 0
        assert jobs[1]["kv_cached_tokens"] >= 192 and jobs[1]["kv_bytes_not_sent"] > 0
        stats = ray.get([d.stats.remote() for d in backend.decode])
        assert stats[1].cache_hit_tokens >= 192 and stats[0].cache_hit_tokens == 0
