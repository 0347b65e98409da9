"""One request's way through a disaggregated deployment, stage by stage. `Lifecycle.run` walks it;
each stage is the method of the same name:

    reserve   wait (FIFO, bounded by page_wait_s and the job's timeout) until a healthy pair's
              decode worker takes the prompt's pages and a slot: so prefill never computes KV
              that no decode worker can take; it shares the prompt's leading pages its prefix
              cache holds and says how many (Reservation.held_pages). With several decode
              workers, those holding the longest prefix are tried first, within load limits
              (control/affinity.py)
    prefill   the pair's prefill worker (or the prefill group, for long prompts) runs the prompt
              (what its own prefix cache holds is not computed again) and samples the first
              token; or, when the decode worker holds all but local_prefill_tokens or fewer of
              the prompt, the decode worker computes the rest itself (prefill_local) and the
              transfer and admit stages have nothing to do
    transfer  each layer's KV leaves for the decode worker the moment it is computed, so the
              transfer overlaps prefill; what remains after prefill is the transfer phase. Only
              the pages after the held ones are sent (a delta transfer)
    admit     the decode worker waits for the last layer (up to transfer_deadline_s), then puts
              the request into its running batch after the first token
    decode    tokens are polled until the request finishes; then `release` frees its pages

How the three state machines line up (router/jobs.py JobState; the decode worker's RequestState
times; engine/sequence.py SeqStatus on the decode worker):

    stage      JobState       RequestState.times     SeqStatus
    reserve    PENDING        reserved               RESERVED (pages held, KV arriving)
    prefill    PREFILLING     -                      RESERVED
    transfer   TRANSFERRING   kv_complete            RESERVED
    admit      DECODING       admitted               RUNNING
    decode     DECODING       first_decode, finished RUNNING -> FINISHED

A job whose prefill or decode worker fails before its first token is tried again on another pair
(`retries`); after a token was sent it fails with a clear error. A request the engine refuses
for one of its own values fails at once as a client error (control/request_faults.py), without
waiting for pages or a retry. Phase times come from the workers' own clocks (time.time), and
the phases tile the job from its arrival to the router receiving its last token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import ray

from zipserve.control.affinity import held_prefixes, order_pairs
from zipserve.control.books import Books, Pair
from zipserve.control.config import ServeConfig
from zipserve.control.messages import DecodeStats, PollReply, Reservation
from zipserve.control.request_faults import RequestRefused, request_fault
from zipserve.control.token_feed import POLL_S, TokenFeed, feed_enabled
from zipserve.control.worker_pool import WorkerPool
from zipserve.engine.disaggregated import Overloaded
from zipserve.engine.page_pool import pages_for
from zipserve.engine.sampling_params import SamplingParams
from zipserve.prefill_group.serving import group_prefill
from zipserve.prefill_worker.worker import PrefillReport
from zipserve.router.backend import BackendEvent, FinishEvent, Job, PhaseEvent, TokenEvent

RESERVE_TIMEOUT_S = 5.0
"""Longest wait for a decode worker to answer a reservation."""


class Retry(Exception):
    """This attempt failed before any token was sent: the job may run on another pair."""


class NoPair(Exception):
    """No pair can take the job (the message says why: unavailable or overloaded)."""


def sampling_params(job: Job) -> SamplingParams:
    """The engine's sampling parameters of a job; ValueError naming the field."""
    return SamplingParams(
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        top_p=job.top_p,
        top_k=max(job.top_k, 0),
        seed=job.seed,
        stop=tuple(job.stop),
        ignore_eos=job.ignore_eos,
        min_tokens=job.min_tokens,
        logprobs=job.logprobs,
    )


class Lifecycle:
    """The stages of every job of one codec's workers."""

    def __init__(
        self,
        cfg: ServeConfig,
        pool: WorkerPool,
        books: Books,
        *,
        page_size: int,
        kv_bytes_per_token_bf16: int,
        prefill_group: Any = None,
    ) -> None:
        self.cfg, self.pool, self.books = cfg, pool, books
        self.codec = cfg.codec
        self.page_size = page_size
        self.kv_bytes_per_token_bf16 = kv_bytes_per_token_bf16
        self.prefill_group = prefill_group
        """A prefill_group.actors.RayPrefillGroup, or None."""
        self._reserve_lock: asyncio.Lock | None = None
        self._released: asyncio.Event | None = None
        """Set whenever a job lets go of its pages: waiting reservations look again."""
        self._feeds: dict[int, tuple[Any, TokenFeed]] = {}
        """Per decode worker index: (its actor, the TokenFeed of the jobs decoding there)."""

    # -- the walk ------------------------------------------------------------------------------
    async def run(self, job: Job) -> AsyncIterator[BackendEvent]:
        """Phase and token events of `job`, ending with one FinishEvent."""
        if job.codec not in (None, self.codec):
            yield FinishEvent(
                "error", error=f"codec: this deployment serves {self.codec!r}, not {job.codec!r}"
            )
            return
        try:
            params = sampling_params(job)
        except ValueError as e:  # its message names the field
            yield self._refused(str(e))
            return
        wait = (
            self.cfg.page_wait_s
            if job.timeout_s is None
            else min(self.cfg.page_wait_s, job.timeout_s)
        )
        wait_until = job.arrival + wait
        errors: list[str] = []
        released = None  # the failed attempt's release, awaited before the next reservation
        for attempt in range(self.cfg.retries + 1):
            await _settled(released)
            try:
                pair, held = await self.reserve(
                    job, params, max(wait_until, time.time() + 1.0) if attempt else wait_until
                )
            except RequestRefused as e:
                yield self._refused(str(e))
                return
            except NoPair as e:
                yield FinishEvent(
                    "error", error="; ".join([str(e)] + errors[-1:]), codec=self.codec
                )
                return
            cost = len(job.prompt_ids) + job.max_tokens
            self.books.outstanding[("d", pair.decode)] += cost
            self.books.jobs[job.id] = pair.decode
            try:
                try:
                    with self.books.kv_pending(pair.decode, len(job.prompt_ids)):
                        if self._local(job, held):
                            report, first = await self.prefill_local(job, pair, held)
                        else:
                            # the transfer runs inside these two: layers leave during prefill,
                            # and admission waits on the decode worker until the last one is in
                            report = await self.prefill(job, params, pair, held.held_pages)
                            first = await self.admit(job, pair, report)
                except RequestRefused as e:
                    yield self._refused(str(e))
                    return
                except Retry as e:
                    errors.append(str(e))
                    self.books.counts["retried"] += attempt < self.cfg.retries
                    continue
                async for ev in self.decode(job, pair, report, first, held):
                    yield ev
                return
            finally:
                self.books.outstanding[("d", pair.decode)] -= cost
                self.books.jobs.pop(job.id, None)
                released = self.release(job, pair)
        yield FinishEvent(
            "error",
            error=f"unavailable: {errors[-1]} (tried {self.cfg.retries + 1} times)",
            codec=self.codec,
        )

    # -- reserve -------------------------------------------------------------------------------
    async def reserve(
        self, job: Job, params: SamplingParams, wait_until: float
    ) -> tuple[Pair, Reservation]:
        """Reserve the job's pages on some usable pair's decode worker, waiting in FIFO order
        while there is none. Raises NoPair (why there is none) or RequestRefused."""
        if self._reserve_lock is None:
            self._reserve_lock, self._released = asyncio.Lock(), asyncio.Event()
        held: dict[int, int] = {}
        if len(self.pool.decode) > 1 and self.cfg.prefix_affinity:
            healthy = {w.index: w.actor for w in self.pool.decode if w.healthy}
            if len(healthy) > 1:
                held = await held_prefixes(healthy, job.prompt_ids)
        async with self._reserve_lock:
            why = "no healthy prefill/decode pair"
            while True:
                for pair in self._candidates(job, held):
                    try:
                        return pair, await self._reserve_on(job, params, pair)
                    except _Refusal as e:
                        why = str(e)
                if not self.pool.usable_pairs():
                    why = "no healthy prefill/decode pair"
                    for role in ("prefill", "decode"):
                        if self.pool.all_dead(role):
                            raise NoPair(f"unavailable: every {role} worker is dead")
                elif not self._candidates(job):
                    raise NoPair(self._too_large(job))
                left = wait_until - time.time()
                if left <= 0:
                    kind = "unavailable" if "healthy" in why or "failed" in why else "overloaded"
                    raise NoPair(f"{kind}: {why} within {self.cfg.page_wait_s:g} s")
                self._released.clear()
                try:
                    await asyncio.wait_for(self._released.wait(), min(0.1, left))
                except asyncio.TimeoutError:
                    pass

    def _candidates(self, job: Job, held: dict[int, int] | None = None) -> list[Pair]:
        """Usable pairs, least loaded first (or, with `held`: decode worker -> leading prompt
        pages it holds, the longest prefix first within the affinity slack), skipping decode
        workers short of pages by their last stats (the reservation itself decides)."""
        need = pages_for(len(job.prompt_ids) + 1, self.page_size)
        pairs = [
            Pair(i, j)
            for i, j in self.pool.usable_pairs()
            if _capacity(self.pool.decode[j].stats, need) >= need
        ]
        if held and any(held.values()):
            return order_pairs(pairs, self.books, held, self.cfg.affinity_slack_tokens)
        return sorted(pairs, key=self.books.load)

    async def _reserve_on(self, job: Job, params: SamplingParams, pair: Pair) -> Reservation:
        """One decode worker's reservation; _Refusal says why it did not take the job."""
        slot = self.pool.decode[pair.decode]
        try:  # a reservation that outlives its timeout here expires on the worker at the
            # transfer deadline, so nothing leaks
            return await asyncio.wait_for(
                slot.actor.reserve.remote(
                    job.id, job.prompt_ids, params, self.cfg.transfer_deadline_s
                ),
                RESERVE_TIMEOUT_S,
            )
        except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
            self.pool.suspect(slot, f"{type(e).__name__}: {e}")
            raise _Refusal(f"decode worker {pair.decode} failed: {type(e).__name__}") from e
        except ray.exceptions.RayTaskError as e:
            if (fault := request_fault(e)) is not None:
                raise RequestRefused(fault) from None  # waiting cannot help
            raise _Refusal(
                f"no decode worker has free KV pages ({e.cause})"
                if isinstance(e.cause, Overloaded)
                else f"decode worker {pair.decode} refused the reservation: "
                f"{type(e.cause).__name__}: {e.cause}"
            ) from e
        except asyncio.CancelledError:  # the job ended while reserving: undo it
            slot.actor.release.remote(job.id)
            raise

    def _too_large(self, job: Job) -> str:
        """Why no decode worker can ever take the job: its prompt needs more pages than any
        of their pools has."""
        need = pages_for(len(job.prompt_ids) + 1, self.page_size)
        cap = max(_capacity(w.stats, 0) for w in self.pool.decode)
        return f"overloaded: the request needs {need} KV pages; a decode worker holds at most {cap}"

    # -- prefill (the transfer runs alongside) -------------------------------------------------
    async def prefill(
        self, job: Job, params: SamplingParams, pair: Pair, held_pages: int = 0
    ) -> PrefillReport:
        """Run the prompt on the pair's prefill worker (or the prefill group); every layer's KV
        after the `held_pages` the decode worker holds streams to it as it is computed (a
        prefill group sends every page: the decode worker skips those it holds). Raises Retry
        when the worker failed."""
        n = len(job.prompt_ids)
        books, slot = self.books, self.pool.prefill[pair.prefill]
        books.outstanding[("p", pair.prefill)] += n
        books.prefilling[pair.prefill] += 1
        try:
            if self.prefill_group is not None and self.cfg.group.use_group(n):
                return await group_prefill(
                    self.prefill_group,
                    self.pool.decode[pair.decode].actor,
                    job.id,
                    job.prompt_ids,
                    params,
                )
            return await slot.actor.prefill.remote(
                job.id, job.prompt_ids, params, f"d{pair.decode}", held_pages
            )
        except ray.exceptions.RayActorError as e:  # the actor died under the job
            self.pool.suspect(slot, f"{type(e).__name__}: {e}")
            books.counts["prefill_worker_died"] += 1
            raise Retry(f"prefill worker {pair.prefill} died: {type(e).__name__}") from e
        except ray.exceptions.RayTaskError as e:  # it raised, e.g. its KV could not be sent
            if (fault := request_fault(e)) is not None:
                raise RequestRefused(fault) from None  # another pair would refuse it too
            cause = getattr(e, "cause", None) or e
            books.counts["prefill_failed"] += 1
            raise Retry(
                f"prefill worker {pair.prefill} failed: {type(cause).__name__}: {cause}"
            ) from e
        finally:
            books.outstanding[("p", pair.prefill)] -= n
            books.prefilling[pair.prefill] -= 1

    # -- or prefill on the decode worker -------------------------------------------------------
    def _local(self, job: Job, held: Reservation) -> bool:
        """The decode worker holds part of the prompt and at most local_prefill_tokens are
        left (a prefill group's prompts always go to the group)."""
        n = len(job.prompt_ids)
        return (
            held.held_pages > 0
            and 0 < n - held.held_pages * self.page_size <= self.cfg.local_prefill_tokens
            and not (self.prefill_group is not None and self.cfg.group.use_group(n))
        )

    async def prefill_local(
        self, job: Job, pair: Pair, held: Reservation
    ) -> tuple[PrefillReport, PollReply]:
        """The decode worker computes the prompt's uncached rest and samples the first token;
        the report it makes counts the held tokens as cached and nothing as sent. Raises Retry
        when the worker failed."""
        slot = self.pool.decode[pair.decode]
        try:
            reply = await slot.actor.prefill_local.remote(job.id, self.cfg.transfer_deadline_s)
        except ray.exceptions.RayError as e:
            if isinstance(e, ray.exceptions.RayActorError):
                self.pool.suspect(slot, f"{type(e).__name__}: {e}")
            self.books.counts["decode_worker_died"] += 1
            raise Retry(f"decode worker {pair.decode} failed: {type(e).__name__}") from e
        start = reply.times.get("local_prefill", time.time())
        end = max(start, reply.times.get("first_token", start))
        report = PrefillReport(
            job.id,
            reply.tokens[0] if reply.tokens else -1,
            reply.logprobs[0] if reply.logprobs else None,
            start,
            end,
            end,
            0,
            0,
            cached_tokens=held.held_pages * self.page_size,
            first_page=held.held_pages,
            local=True,
        )
        return report, reply

    # -- admit (after the transfer) ------------------------------------------------------------
    async def admit(self, job: Job, pair: Pair, report: PrefillReport) -> PollReply:
        """The decode worker waits until every layer is in (the transfer deadline), then
        admits the request after its first token; its first reply. Raises Retry when the
        worker failed."""
        slot = self.pool.decode[pair.decode]
        try:
            return await slot.actor.admit.remote(
                job.id,
                report.first_token,
                report.first_logprob,
                self.cfg.transfer_deadline_s,
                report.first_top_logprobs,
            )
        except ray.exceptions.RayError as e:
            if isinstance(e, ray.exceptions.RayActorError):
                self.pool.suspect(slot, f"{type(e).__name__}: {e}")
            self.books.counts["decode_worker_died"] += 1
            raise Retry(f"decode worker {pair.decode} failed: {type(e).__name__}") from e

    # -- decode --------------------------------------------------------------------------------
    async def decode(
        self,
        job: Job,
        pair: Pair,
        report: PrefillReport,
        reply: PollReply,
        held: Reservation | None = None,
    ) -> AsyncIterator[BackendEvent]:
        """The phases up to prefill's end, then token events as they are decoded with the
        transfer and decode_queue phases once known, then decode and the finish (with the KV
        bytes the prefill side sent and what the prefix caches saved). Each phase starts where
        the previous one ended."""
        start = max(job.arrival, report.prefill_start)
        prefill_end = max(start, report.prefill_end)
        yield PhaseEvent("queue", job.arrival, start)
        yield PhaseEvent("prefill", start, prefill_end)
        dec = self.pool.decode[pair.decode].actor
        held_tokens = 0 if held is None else held.held_pages * self.page_size
        sent_tokens = (
            0 if report.local else len(job.prompt_ids) - report.first_page * self.page_size
        )
        kv_bytes = {
            "kv_bytes": report.bytes_sent,  # the prefill side knows what it sent
            "kv_bytes_bf16": sent_tokens * self.kv_bytes_per_token_bf16,
            "kv_bytes_not_sent": report.bytes_not_sent,
            "cached_tokens": report.cached_tokens,
            "kv_cached_tokens": held_tokens,
            "local_prefill": report.local,
            "kv_sent_end": None if report.local else report.send_end,
        }
        sent, text, decode_start = 0, "", prefill_end
        phases_done = False
        while True:
            if not phases_done and ("admitted" in reply.times or reply.finished):
                phases_done = True
                transfer, queued = transfer_phases(prefill_end, reply)
                yield transfer
                yield queued
                decode_start = queued.end
            for k, tok in enumerate(reply.tokens):  # the batch's new text rides on its last
                delta = reply.text[len(text) :] if k == len(reply.tokens) - 1 else ""
                text += delta
                yield TokenEvent(
                    tok,
                    delta,
                    reply.logprobs[k] if k < len(reply.logprobs) else None,
                    tuple(map(tuple, reply.top_logprobs[k])) if k < len(reply.top_logprobs) else (),
                )
            sent += len(reply.tokens)
            if reply.finished:
                # Decode ends when the router holds the last token, i.e. when it handles the
                # finish event: the span is left open here and the router closes it with the
                # same stamp as the job's end (a stamp taken here could be a GIL switch
                # interval, 5 ms, earlier), so the phases tile the JCT exactly.
                yield PhaseEvent("decode", decode_start)
                yield FinishEvent(
                    reply.finish_reason, error=reply.error, codec=self.codec, **kv_bytes
                )
                return
            try:
                reply = await self._next_reply(pair.decode, dec, job.id, sent)
            except ray.exceptions.RayError as e:  # the decode worker died mid-stream
                self.books.counts["decode_worker_died"] += 1
                yield FinishEvent(
                    "error",
                    error=f"unavailable: decode worker failed while decoding: {type(e).__name__}",
                    codec=self.codec,
                    **kv_bytes,
                )
                return

    async def _next_reply(self, decode: int, actor: Any, request_id: str, sent: int) -> PollReply:
        """The job's next tokens: through the decode worker's TokenFeed (one poll for all its
        jobs; a replaced actor gets a new feed), or its own poll with ZIPSERVE_TOKEN_FEED=0."""
        if not feed_enabled():
            return await actor.poll.remote(request_id, sent, POLL_S)
        held = self._feeds.get(decode)
        if held is None or held[0] is not actor:
            held = self._feeds[decode] = (
                actor,
                TokenFeed(lambda *a: actor.poll_many.remote(*a)),
            )
        return await held[1].next(request_id, sent)

    # -- release -------------------------------------------------------------------------------
    def release(self, job: Job, pair: Pair) -> ray.ObjectRef:
        """Free whatever the decode worker holds for the job; waiting reservations look again.
        Returns the call's ObjectRef (a retry awaits it before reserving again)."""
        released = self.pool.decode[pair.decode].actor.release.remote(job.id)
        if self._released is not None:
            self._released.set()
        return released

    def _refused(self, message: str) -> FinishEvent:
        """The engine refused a value of the request: a client error (400)."""
        return FinishEvent("error", error=message, client_error=True, codec=self.codec)


class _Refusal(Exception):
    """One decode worker did not take a reservation (the message says why)."""


def transfer_phases(prefill_end: float, reply: PollReply) -> tuple[PhaseEvent, PhaseEvent]:
    """The transfer (what remained of it after prefill ended; 0 when it fully overlapped) and
    the wait for a place in the decode batch, from the decode worker's clock."""
    t_kv = max(prefill_end, reply.times.get("kv_complete", prefill_end))
    t_admitted = max(t_kv, reply.times.get("admitted", t_kv))
    return PhaseEvent("transfer", prefill_end, t_kv), PhaseEvent("decode_queue", t_kv, t_admitted)


def _capacity(stats: DecodeStats | None, default: int) -> int:
    """A decode worker's pool size by its last stats (default before its first answer)."""
    return default if stats is None else stats.capacity_pages


async def _settled(release: ray.ObjectRef | None) -> None:
    """Wait (bounded) for an earlier attempt's release; a dead worker's reservation is gone
    with it."""
    if release is None:
        return
    try:
        await asyncio.wait_for(release, RESERVE_TIMEOUT_S)
    except (ray.exceptions.RayError, asyncio.TimeoutError):
        pass
