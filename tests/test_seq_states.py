"""engine/: a sequence whose KV is written from outside is RESERVED (pages and a slot held) until
it is admitted, and every way out of RESERVED returns what it held."""

from __future__ import annotations

import pytest

from zipserve.engine.page_pool import PagePool
from zipserve.engine.sampling_params import SamplingParams
from zipserve.engine.scheduler import Scheduler
from zipserve.engine.sequence import SeqStatus, Sequence


def _setup():
    pool = PagePool(9)
    return pool, Scheduler(pool, page_size=4, max_num_seqs=2, max_prefill_tokens=64)


def _seq(i: int, n: int = 10) -> Sequence:
    return Sequence(i, f"r{i}", list(range(3, 3 + n)), SamplingParams())


def test_reserve_admit_finish():
    pool, sch = _setup()
    seq = _seq(1)
    assert seq.status is SeqStatus.WAITING
    assert sch.reserve(seq, seq.num_tokens)
    assert seq.reserved and seq.status is SeqStatus.RESERVED
    assert len(seq.pages) == 3 and seq.slot >= 0 and sch.reserved == {1: seq}
    assert not sch.has_unfinished()  # nothing to step until its KV is in
    sch.admit(seq)
    assert seq.status is SeqStatus.RUNNING and sch.running == [seq] and not sch.reserved
    with pytest.raises(KeyError, match="not reserved"):
        sch.admit(seq)
    sch.finish(seq, "stop")
    assert seq.finished and pool.num_free == pool.capacity and len(sch.free_slots) == 2


def test_a_reservation_ended_before_admission_gives_everything_back():
    pool, sch = _setup()
    a, b = _seq(1), _seq(2)
    assert sch.reserve(a, a.num_tokens) and sch.reserve(b, b.num_tokens)
    assert not sch.reserve(_seq(3), 4)  # both slots are held by reservations
    sch.finish(a, "abort")
    assert a.finished and list(sch.reserved) == [2]
    sch.finish(b, "abort")
    assert pool.num_free == pool.capacity and len(sch.free_slots) == 2 and not sch.reserved
