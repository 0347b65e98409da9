"""The prefill and decode actors of one deployment, their KV channels and their health.

`WorkerPool` starts the actors (Ray restarts a dead one up to `max_restarts` times), connects one
KV channel per (prefill, decode) pair, and runs a monitor thread that asks every actor for its
stats every `health_interval_s`:
- a worker that does not answer (dead, restarting, hung) is marked unhealthy at once, and so is
  every pair it belongs to: the backend routes no new job to it;
- a worker that answers with a new `incarnation` was restarted by Ray: its pairs are connected
  again (fresh channels on both sides) before it is marked healthy;
- a decode worker that reports a dead channel (its peer died, or the transport failed a
  checksum) gets that pair reconnected.
The request path reads the flags and the cached stats only; it never waits on the monitor.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import ray

from zipserve.control.messages import DecodeStats, PrefillStats

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 90.0


@dataclass
class WorkerSlot:
    """One actor as the router sees it."""

    role: Literal["prefill", "decode"]
    index: int
    actor: Any
    healthy: bool = False
    incarnation: str | None = None
    stats: PrefillStats | DecodeStats | None = None
    """Its last answer to a health check."""
    last_error: str | None = None
    restarts_seen: int = 0
    dead: bool = False
    """Ray says it died for good (killed without restart, or out of restarts)."""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def peer_id(self) -> str:
        """How the other side of a channel names this worker (d0, p1, ...)."""
        return f"{self.role[0]}{self.index}"


class WorkerPool:
    def __init__(
        self,
        prefill_cls,
        decode_cls,
        prefill_args: dict,
        decode_args: dict,
        num_prefill: int,
        num_decode: int,
        *,
        link_gbps: float | None,
        link_latency_ms: float,
        health_interval_s: float = 0.5,
        prefill_first: bool = False,
    ) -> None:
        """prefill_first: start the decode workers only once every prefill worker is up (when
        they share GPUs, so the decode engines size their pools from what is then free)."""
        self.link_gbps, self.link_latency_ms = link_gbps, link_latency_ms
        self.health_interval_s = health_interval_s
        self.prefill = [
            WorkerSlot("prefill", i, prefill_cls.remote(**prefill_args)) for i in range(num_prefill)
        ]
        if prefill_first:
            ray.get([w.actor.stats.remote() for w in self.prefill], timeout=CONNECT_TIMEOUT_S)
        self.decode = [
            WorkerSlot("decode", j, decode_cls.remote(**decode_args)) for j in range(num_decode)
        ]
        self.pair_ok: dict[tuple[int, int], bool] = {}
        self.pair_names: dict[tuple[int, int], str] = {}
        """The name of each pair's current channel (a new one per connection)."""
        self._generation = 0
        self.events: Counter[str] = Counter()
        """worker_lost, worker_restarted, channel_reconnected."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        for w, stats in zip(
            self.workers,
            ray.get([w.actor.stats.remote() for w in self.workers], timeout=CONNECT_TIMEOUT_S),
        ):
            w.stats, w.incarnation = stats, stats.incarnation
        if not self._connect([(p, d) for p in self.prefill for d in self.decode]):
            raise RuntimeError(
                "the prefill and decode workers could not connect their KV channels (see the log)"
            )
        for w in self.workers:
            w.healthy = True
        self._thread = threading.Thread(target=self._monitor, name="zipserve-health", daemon=True)
        self._thread.start()

    @property
    def workers(self) -> list[WorkerSlot]:
        return self.prefill + self.decode

    # -- what the request path asks ----------------------------------------------------------
    def usable(self, i: int, j: int) -> bool:
        return (
            self.prefill[i].healthy and self.decode[j].healthy and self.pair_ok.get((i, j), False)
        )

    def usable_pairs(self) -> list[tuple[int, int]]:
        return [
            (i, j)
            for i in range(len(self.prefill))
            for j in range(len(self.decode))
            if self.usable(i, j)
        ]

    def suspect(self, w: WorkerSlot, error: str) -> None:
        """A call to `w` failed in the request path: stop routing to it until the monitor has
        seen it answer again (reconnecting its pairs if it was restarted)."""
        with self._lock:
            if w.healthy:
                self.events["worker_lost"] += 1
            w.healthy, w.last_error = False, error
            self._drop_pairs(w)

    def all_dead(self, role: str) -> bool:
        """Every worker of this role died for good: waiting for one is pointless."""
        return all(w.dead for w in (self.prefill if role == "prefill" else self.decode))

    # -- monitor -----------------------------------------------------------------------------
    def _monitor(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            workers = self.workers
            refs = [w.actor.stats.remote() for w in workers]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STATS_TIMEOUT_S)
            for w, ref in zip(workers, refs):
                if self._stop.is_set():
                    return
                try:
                    stats = (
                        ray.get(ref, timeout=0)
                        if ref in ready
                        else TimeoutError(
                            f"no answer to a health check within {STATS_TIMEOUT_S:g} s"
                        )
                    )
                except Exception as e:
                    stats = e
                try:
                    self._check(w, stats)
                except Exception:  # the monitor itself must never die
                    log.exception("health check of %s failed", w.name)

    def _check(self, w: WorkerSlot, stats: PrefillStats | DecodeStats | Exception) -> None:
        """Apply one health-check answer (its stats, or why there were none)."""
        if isinstance(stats, Exception):
            e = stats
            with self._lock:
                if w.healthy:
                    self.events["worker_lost"] += 1
                    log.warning("%s stopped answering: %s", w.name, e)
                w.healthy, w.last_error = False, f"{type(e).__name__}: {e}"
                w.dead = isinstance(e, ray.exceptions.ActorDiedError)
                self._drop_pairs(w)
            return
        w.stats, w.dead = stats, False
        if stats.incarnation != w.incarnation:  # Ray restarted it: its channels are gone
            with self._lock:
                w.healthy = False
                self._drop_pairs(w)
            w.incarnation = stats.incarnation
            w.restarts_seen += 1
            self.events["worker_restarted"] += 1
            log.warning("%s was restarted; connecting its channels again", w.name)
        elif isinstance(stats, DecodeStats):
            for pid, name in stats.dead_channels.items():
                i = int(pid[1:])
                # only the pair's current channel counts (stats may predate a reconnect)
                if self.pair_ok.get((i, w.index)) and self.pair_names.get((i, w.index)) == name:
                    self.pair_ok[(i, w.index)] = False
                    self.events["channel_reconnected"] += 1
        broken = [
            (p, d)
            for p, d in self._pairs_of(w)
            if not self.pair_ok.get((p.index, d.index)) and (d if p is w else p).healthy
        ]
        self._connect(broken)  # a pair that fails to connect is retried on the next round
        if not w.healthy:
            with self._lock:
                w.healthy, w.last_error = True, None

    def _pairs_of(self, w: WorkerSlot) -> list[tuple[WorkerSlot, WorkerSlot]]:
        if w.role == "prefill":
            return [(w, d) for d in self.decode]
        return [(p, w) for p in self.prefill]

    def _drop_pairs(self, w: WorkerSlot) -> None:
        for i, j in list(self.pair_ok):
            if (w.role == "prefill" and i == w.index) or (w.role == "decode" and j == w.index):
                self.pair_ok[(i, j)] = False

    def _connect(self, pairs: list[tuple[WorkerSlot, WorkerSlot]]) -> bool:
        """Open a fresh KV channel for each (prefill, decode) pair; prefill hosts the
        rendezvous on its own node (loopback when every actor runs on the driver's node)."""
        if not pairs:
            return True
        try:
            here = ray.get_runtime_context().get_node_id()
            calls, names = [], []
            for p, d in pairs:
                ep = ray.get(p.actor.endpoint.remote(), timeout=CONNECT_TIMEOUT_S)
                d_node = ray.get(d.actor.endpoint.remote(), timeout=CONNECT_TIMEOUT_S)["node_id"]
                local = ep["node_id"] in ("", here) and d_node in ("", here)
                host = "127.0.0.1" if local else ep["node_ip"]
                self._generation += 1
                name = f"p{p.index}-d{d.index}-g{self._generation}"
                calls += [
                    p.actor.connect.remote(
                        d.peer_id, host, ep["port"], 0, name, self.link_gbps, self.link_latency_ms
                    ),
                    d.actor.connect.remote(
                        p.peer_id, host, ep["port"], 1, name, self.link_gbps, self.link_latency_ms
                    ),
                ]
                names.append(name)
            ray.get(calls, timeout=CONNECT_TIMEOUT_S)
        except Exception as e:
            log.warning("connecting %s failed: %s", [(p.name, d.name) for p, d in pairs], e)
            return False
        for (p, d), name in zip(pairs, names):
            self.pair_names[(p.index, d.index)] = name
            self.pair_ok[(p.index, d.index)] = True
        return True

    def pairs_view(self) -> dict[str, bool]:
        """ "prefill-i/decode-j" -> whether jobs can be routed to that pair now."""
        return {
            f"{p.name}/{d.name}": self.usable(p.index, d.index)
            for p in self.prefill
            for d in self.decode
        }

    # -- reporting and shutdown --------------------------------------------------------------
    def failures(self) -> Counter[str]:
        """Failure counts the decode workers report (their counters restart with them)."""
        total: Counter[str] = Counter()
        for d in self.decode:
            if d.stats is not None:
                total.update(d.stats.failures)
        return total

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=STATS_TIMEOUT_S + 1)
