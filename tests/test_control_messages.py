"""control/: the typed /health reports serialise to exactly the JSON the dict-building code served
(same keys, order and values, so /health's bytes do not change; the prefix-cache keys of issue
20 come last), from a backend's cached worker stats; worker replies read by attribute (and, for
callers not moved yet, by key)."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from zipserve.control.books import Books
from zipserve.control.messages import (
    DecodeStats,
    MultiCodecHealth,
    PollReply,
    PrefillStats,
    WorkerInfo,
)
from zipserve.control.multi_codec import MultiCodecBackend
from zipserve.control.ray_backend import RayBackend
from zipserve.control.worker_pool import WorkerSlot
from zipserve.transfer.pairing import COMPAT_KEYS


def _stats(role: str, codec: str, **kw):
    common = dict(
        free_pages=90, used_pages=10, capacity_pages=100, running=2, codec=codec, incarnation="i0"
    )
    return (
        PrefillStats(**common, prefills=4, cache_lookup_tokens=400, cache_hit_tokens=100)
        if role == "prefill"
        else DecodeStats(
            **common, reserved=1, decode_kv="dense", failures={"transfer_deadline": 2}, **kw
        )
    )


class _Pool:
    def __init__(self, codec: str):
        self.prefill = [WorkerSlot("prefill", 0, None, True, "i0", _stats("prefill", codec))]
        self.decode = [
            WorkerSlot(
                "decode",
                0,
                None,
                False,
                "i0",
                _stats("decode", codec),
                last_error="TimeoutError: no answer",
                restarts_seen=1,
            ),
            WorkerSlot("decode", 1, None, True),
        ]  # no stats yet
        self.events = Counter(worker_lost=1)

    @property
    def workers(self):
        return self.prefill + self.decode

    def usable_pairs(self):
        return [(0, 1)]

    def pairs_view(self):
        return {"prefill-0/decode-0": False, "prefill-0/decode-1": True}

    def failures(self):
        return Counter({"transfer_deadline": 2})


def _backend(codec: str) -> RayBackend:
    b = object.__new__(RayBackend)  # the report reads only cached state: no Ray, no actors
    b.cfg = SimpleNamespace(codec=codec)
    b.pool, b.device, b.decode_kv = _Pool(codec), "cpu", "dense"
    b.books = Books.empty(1, 2)
    b.books.outstanding[("p", 0)], b.books.prefilling[0], b.books.awaiting_kv[0] = 130, 1, 130
    b.books.counts.update(retried=1, prefill_failed=0)
    return b


def _dict_health(b: RayBackend) -> dict:
    """What RayBackend.health built as a dict before it was typed (issue 17), verbatim."""
    workers = []
    for w in b.pool.workers:
        st = {} if w.stats is None else {k: v for k, v in vars(w.stats).items()}
        if w.role == "prefill":
            queued, running = b.books.outstanding[("p", w.index)], b.books.prefilling[w.index]
        else:
            queued, running = b.books.awaiting_kv[w.index], int(st.get("running", 0))
        workers.append(
            {
                "name": w.name,
                "role": w.role,
                "healthy": w.healthy,
                "codec": st.get("codec", b.cfg.codec),
                "decode_kv": st.get("decode_kv"),
                "free_pages": int(st.get("free_pages", 0)),
                "used_pages": int(st.get("used_pages", 0)),
                "queued_tokens": queued,
                "running": running,
                "restarts": w.restarts_seen,
                "dead": w.dead,
                "error": w.last_error,
                # added with prefix caching in the workers (issue 20)
                "cached_pages": int(st.get("cached_pages", 0)),
                "cache_hit_rate": (
                    st["cache_hit_tokens"] / st["cache_lookup_tokens"]
                    if st.get("cache_lookup_tokens")
                    else None
                ),
            }
        )
    failures = b.pool.failures() + b.books.counts
    usable = bool(b.pool.usable_pairs())
    return {
        "status": "ok" if usable else "unavailable",
        "codec": b.cfg.codec,
        "decode_kv": b.decode_kv,
        "device": b.device,
        "workers": workers,
        "pairs": b.pool.pairs_view(),
        "degraded": not all(w.healthy for w in b.pool.workers),
        "failures": dict(failures),
        "events": dict(b.pool.events),
    }


def _bytes(d: dict) -> bytes:  # as starlette's JSONResponse renders it
    return json.dumps(
        d, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode()


def test_one_codec_health_is_byte_identical():
    b = _backend("hack2")
    assert _bytes(b.health()) == _bytes(_dict_health(b))
    workers = b.health()["workers"]
    assert [w["decode_kv"] for w in workers] == [None, "dense", None]
    assert workers[2]["free_pages"] == 0 and workers[2]["codec"] == "hack2"
    assert [w["cache_hit_rate"] for w in workers] == [0.25, None, None]


def test_several_codecs_health_is_byte_identical():
    m = object.__new__(MultiCodecBackend)
    m.codecs, m.device = ("hack2", "bf16"), "cpu"
    m.lanes = {c: _backend(c) for c in m.codecs}
    views = {codec: _dict_health(lane) for codec, lane in m.lanes.items()}
    failures, events = Counter(), Counter()
    for v in views.values():
        failures.update(v["failures"])
        events.update(v["events"])
    ok = [v["status"] == "ok" for v in views.values()]
    want = {
        "status": "ok" if any(ok) else "unavailable",
        "codec": m.codecs[0],
        "codecs": list(m.codecs),
        "device": m.device,
        "workers": [
            dict(w, name=f"{codec}/{w['name']}") for codec, v in views.items() for w in v["workers"]
        ],
        "pairs": {c: v["pairs"] for c, v in views.items()},
        "degraded": not all(ok) or any(v["degraded"] for v in views.values()),
        "failures": dict(failures),
        "events": dict(events),
        "lanes": {c: v["status"] for c, v in views.items()},
        "decode_kv": m.lanes[m.codecs[0]].decode_kv,
        "lane_decode_kv": {c: lane.decode_kv for c, lane in m.lanes.items()},
    }
    assert _bytes(m.health()) == _bytes(want)
    assert isinstance(m.health_report(), MultiCodecHealth)


def test_replies_read_by_attribute():
    r = PollReply([5, 6], [], [], "ab", True, "length", None, {"admitted": 1.0})
    assert r.tokens == [5, 6] and r.times == {"admitted": 1.0}
    with pytest.raises(TypeError):  # not a dict any more: one way to read a reply
        r["tokens"]
    info = WorkerInfo("m", "hack2", 64, 6, "cpu")
    assert info.hello() == {
        "model": "m",
        "codec": "hack2",
        "page_size": 64,
        "num_layers": 6,
        "device": "cpu",
    }
    dec = WorkerInfo("m", "hack2", 64, 6, "cpu", "dense", "CPU: the compressed path runs ...")
    paired = [{k: w.hello()[k] for k in COMPAT_KEYS} for w in (info, dec)]
    assert paired[0] == paired[1]  # the reason (and decode_kv) is not paired on
