"""DecodeWorker: reserves pages for incoming requests, receives their KV layer by layer from
prefill workers, and decodes every admitted request in one continuous batch.

Plain Python (control/ wraps it as a threaded Ray actor; it answers with control/messages.py's
types). A receiver thread per attached channel (receiver.py) takes layers off it and queues them
(a device layer's checksum queued on the GPU, not awaited); the step loop imports the queued
layers whose checksum is done, decodes, and expires reservations whose KV missed its deadline;
callers reserve/admit/abort/poll; the step loop and callers touch the engine under one lock. A
returner thread gives imported CUDA-IPC layers back to their senders (buffer_returns.py).
Every path that ends a request (finish, abort, deadline, corrupt KV) frees its pages.
With a prefix cache (on by default) a reservation shares the prompt's leading pages the worker
already holds (imported for an earlier prompt, or, bf16, filled by its decode steps) and says how
many (`Reservation.held_pages`): the prefill worker then sends only the pages after them, or,
when what is left is short, the router asks this worker to compute it itself (`prefill_local`:
nothing crosses the link).

Failures are counted by reason in `failures` ("transfer_deadline", "checksum_mismatch": the
wire's ChecksumError, "kv_rejected", "decode_step"); a channel whose transport broke (peer died,
checksum mismatch on the channel) is listed in `dead_channels` until the router connects a new
one. `incarnation` is new each time the worker is built, so a restarted actor is told apart from
the one before it.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
import uuid

from zipserve.compress.wire import DeviceLayerKV, LayerKV
from zipserve.control.gil_switch import apply_worker_switch_interval
from zipserve.control.messages import (
    DecodeStats,
    FeedReply,
    PollReply,
    Reservation,
    WorkerInfo,
)
from zipserve.control.stall_monitor import StallMonitor
from zipserve.decode_worker.arrivals import IMPORT_POLL_S, ArrivalQueue, import_during_step
from zipserve.decode_worker.buffer_returns import BufferReturns
from zipserve.decode_worker.receiver import ReceiveHooks, receive_layers
from zipserve.decode_worker.request_state import (
    CHECKSUM_MISMATCH,
    TRANSFER_DEADLINE,
    RequestState,
    failure_reason,
    unknown_request_reply,
)
from zipserve.decode_worker.step_trace import ReceiveTrace, ReturnTrace, StepTrace
from zipserve.engine.detokenizer import stop_prefix_len
from zipserve.engine.disaggregated import DisaggregatedEngine
from zipserve.engine.llm_engine import LaunchedStep
from zipserve.engine.prefix_cache import worker_cache_fields
from zipserve.engine.sampling_params import SamplingParams
from zipserve.prefill_group.slices import SliceAssembler
from zipserve.prefill_worker.worker import KV_TAG
from zipserve.transfer.channel import Channel, TransferChecksumError
from zipserve.transfer.kv_messages import done, settled
from zipserve.transfer.pairing import connect_pair, local_endpoint


class DecodeWorker:
    def __init__(
        self,
        model: str,
        codec: str = "bf16",
        device: str | None = None,
        dtype: str = "auto",
        engine_options: dict | None = None,
    ):
        apply_worker_switch_interval()
        self.engine = DisaggregatedEngine.for_worker(model, codec, device, dtype, engine_options)
        self.codec = codec
        self.num_layers = self.engine.config.num_kv_layers  # layers whose KV arrives
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.progress = 0
        """Bumped (under the lock) whenever a request's state changes: poll_many waits on it."""
        self.requests: dict[str, RequestState] = {}
        self.dropped_messages = 0
        self.incarnation = uuid.uuid4().hex
        self._slices = SliceAssembler()  # KV slices from a prefill group, per (request, layer)
        self.failures: collections.Counter[str] = collections.Counter()
        self.channels: dict[str, Channel] = {}
        self.channel_names: dict[str, str] = {}
        self.dead_channels: dict[str, str] = {}
        """peer id -> name of its channel, for channels whose transport broke."""
        self._aborts: collections.deque[str] = collections.deque()
        self._arrivals = ArrivalQueue()
        """Received layers waiting for the step loop to write them into the pool."""
        self._stop = threading.Event()
        self.trace = StepTrace(tag=codec)
        """Per-pass timings of the step loop, when ZIPSERVE_STEP_TRACE names a folder."""
        self.recv_trace = ReceiveTrace(tag=codec)
        """Per-layer timings of the receive threads (same switch)."""
        self._import_during_step = import_during_step()
        self.return_trace = ReturnTrace(tag=codec)
        """Per-batch timings of giving CUDA-IPC layers back (same switch)."""
        self._returns = BufferReturns(trace=self.return_trace)
        """Gives imported CUDA-IPC layers back to their senders off the step loop."""
        self.stall_monitor = StallMonitor("decode", tag=codec)
        """When this process ran no Python (same switch; control/stall_monitor.py)."""
        self._threads = [threading.Thread(target=self._step_loop, name="decode-steps", daemon=True)]
        self._threads[0].start()

    def info(self) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(
            e.model_name,
            self.codec,
            e.engine_config.page_size,
            self.num_layers,
            str(e.device),
            e.decode_kv,
            e.decode_kv_reason,
        )

    # -- KV arrival ------------------------------------------------------------------------
    def connect(
        self,
        peer_id: str,
        host: str,
        port: int,
        rank: int,
        pair_name: str,
        link_gbps: float | None = None,
        latency_ms: float = 0.0,
    ) -> None:
        """Open the KV channel to a peer worker (see transfer/pairing.py) and attach it."""
        self.attach(
            peer_id,
            connect_pair(self.info().hello(), host, port, rank, pair_name, link_gbps, latency_ms),
            pair_name,
        )

    def endpoint(self) -> dict:
        """This worker's Ray node and a free port on it (see transfer.pairing.local_endpoint)."""
        return local_endpoint()

    def attach(self, prefill_id: str, channel: Channel, name: str = "") -> None:
        """Receive KV from `prefill_id` over `channel` (named `name`), replacing any earlier
        channel from that peer."""
        with self.lock:
            old, self.channels[prefill_id] = self.channels.get(prefill_id), channel
            self.channel_names[prefill_id] = name
            self.dead_channels.pop(prefill_id, None)
        if old is not None:  # replaced after a peer restart: its thread ends once it is closed
            threading.Thread(target=old.close, daemon=True).start()
        hooks = ReceiveHooks(
            arrive=self._arrive,
            lost=functools.partial(self._channel_lost, prefill_id, channel),
            unreadable=self._drop_message,
        )
        t = threading.Thread(
            target=receive_layers,
            args=(channel, KV_TAG, self._stop, hooks, self.recv_trace),
            name=f"kv-recv-{prefill_id}",
            daemon=True,
        )
        self._threads = [th for th in self._threads if th.is_alive()] + [t]
        t.start()

    def _channel_lost(self, prefill_id: str, channel: Channel, error: Exception) -> None:
        with self.lock:
            if isinstance(error, TransferChecksumError):  # the channel's own frame check
                self.failures[CHECKSUM_MISMATCH] += 1
            if self.channels.get(prefill_id) is channel:
                self.dead_channels[prefill_id] = self.channel_names.get(prefill_id, "")

    def _drop_message(self) -> None:
        """A message no request can be blamed for: counted, and the receiver goes on."""
        self.dropped_messages += 1

    def import_kv_slice(self, data: bytes) -> None:
        """One rank's slice of one layer from a sequence-parallel prefill group
        (prefill_group/slices.py); the layer is imported once all the group's slices are in."""
        with self.lock:
            try:
                kv = self._slices.add(data, accept=self._expects_kv)
            except Exception:  # noqa: BLE001 - unreadable or duplicate: count it and go on
                self._drop_message()
                return
        if kv is not None:
            self._arrive(kv)

    def _arrive(self, kv: LayerKV | DeviceLayerKV, received_s: float | None = None) -> float:
        """Hand a received layer to the step loop (decode_worker/arrivals.py says why not import
        it here). received_s: when its first message came off the channel (the step trace's
        recv_ms). Returns the hand-over time."""
        return self._arrivals.put(kv, received_s)

    def _import_arrivals(self) -> tuple[list[LayerKV | DeviceLayerKV], float, float]:
        """Import every waiting layer whose checksum the GPU has computed (caller holds the
        lock); the others stay for a later pass (a layer of a request that ended goes now: its
        import drops it). Returns the imported for `done`, how long (ms) the one that waited
        longest had waited for this since its hand-over, and the longest any of them took the
        receive thread (ms, its first message off the channel to its hand-over)."""
        t0 = time.time()
        arrivals = self._arrivals.take(
            lambda kv: settled(kv) or not self._expects_kv(kv.request_id)
        )
        for arrival in arrivals:
            kv = arrival.kv
            try:
                self._import(kv)
            except Exception as e:  # noqa: BLE001 - fail this request, keep the loop alive
                st = self.requests.get(kv.request_id)
                if st is not None and not st.finished:
                    self._fail(
                        kv.request_id, f"KV import failed: {type(e).__name__}: {e}", "kv_import"
                    )
        if not arrivals:
            return [], 0.0, 0.0
        waited_ms = 1e3 * (t0 - min(a.arrived_s for a in arrivals))
        recv_ms = 1e3 * max(a.arrived_s - a.received_s for a in arrivals)
        return [a.kv for a in arrivals], waited_ms, recv_ms

    def _import_while_running(
        self, launched: LaunchedStep
    ) -> tuple[list[LayerKV | DeviceLayerKV], float, float]:
        """While the GPU runs a launched step, import layers as they arrive (caller holds the
        lock; their copies queue behind the step): a layer then waits about a poll interval for
        its import, not until the step has ended, and the host's import work hides behind the
        step's device time. Polls only while some request still expects KV (else returns at
        once and finish_step waits). Returns what _import_arrivals does, over every pass.
        Which requests await KV changes only under the lock this thread holds, so it is
        looked up again only after imports (which may complete or fail one), not every poll."""
        imported: list[LayerKV | DeviceLayerKV] = []
        waited_ms = recv_ms = 0.0
        awaiting = self._import_during_step and self._awaiting_kv()
        while awaiting and not launched.done():
            if self._arrivals:
                taken, w, r = self._import_arrivals()
                if taken:
                    imported += taken
                    waited_ms, recv_ms = max(waited_ms, w), max(recv_ms, r)
                    awaiting = self._awaiting_kv()
                    continue
            self._arrivals.wait(IMPORT_POLL_S)  # until a layer comes in, or the next look
        return imported, waited_ms, recv_ms

    def _awaiting_kv(self) -> bool:
        """Some request has room reserved and still waits for layers."""
        return any(not st.finished and not st.arrived.is_set() for st in self.requests.values())

    def _expects_kv(self, request_id: str) -> bool:
        st = self.requests.get(request_id)
        return st is not None and not st.finished

    def _import(self, kv: LayerKV | DeviceLayerKV) -> None:
        with self.lock:
            st = self.requests.get(kv.request_id)
            if st is None or st.finished:
                return  # aborted or expired meanwhile: drop the layer
            try:
                self.engine.import_layer(kv.request_id, kv)
            except (ValueError, KeyError) as e:
                self._fail(kv.request_id, f"KV rejected: {e}", failure_reason(e))
                return
            st.layers += 1
            if st.layers == self.num_layers:
                st.times["kv_complete"] = time.time()
                st.arrived.set()

    # -- control (called by the router) ------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        deadline_s: float = 30.0,
    ) -> Reservation:
        """Pages and a slot for the request, its leading cached pages shared (held_pages: only
        the pages after them need to arrive). Raises engine.disaggregated.Overloaded when pages
        or slots are short."""
        with self.lock:
            held = self.engine.reserve(request_id, prompt_ids, params)
            self.requests[request_id] = RequestState(
                deadline=time.time() + deadline_s,
                times={"reserved": time.time()},
                stop=tuple(params.stop),
            )
        return Reservation(held, self.engine.engine_config.page_size)

    def cached_prefix_pages(self, prompt_ids: list[int]) -> int:
        """Leading full pages of a prompt this worker's prefix cache holds now (for routing)."""
        with self.lock:
            return self.engine.cached_prefix_pages(prompt_ids)

    def admit(
        self,
        request_id: str,
        first_token: int,
        first_logprob: float | None,
        timeout: float = 30.0,
        first_top_logprobs: list[tuple[int, float]] | None = None,
    ) -> PollReply:
        st = self.requests[request_id]
        if not st.arrived.wait(timeout):
            with self.lock:
                if not st.finished:
                    self._fail(
                        request_id,
                        f"KV transfer missed its deadline: incomplete "
                        f"after {timeout:.1f} s ({st.layers}/"
                        f"{self.num_layers} layers)",
                        TRANSFER_DEADLINE,
                    )
            return self.poll(request_id, 0, 0)
        with self.lock:
            if st.finished:
                return self.poll(request_id, 0, 0)
            out = self.engine.admit(request_id, first_token, first_logprob, first_top_logprobs)
            st.times["admitted"] = time.time()
            self._update(st, out)
            self._notify()
        return self.poll(request_id, 0, 0)

    def prefill_local(self, request_id: str, timeout: float = 30.0) -> PollReply:
        """Compute a reserved request's uncached prompt tokens here instead of receiving them (a
        local prefill): it prefills with the next step after its cached pages, samples its
        first token and decodes on. Returns once that token is out (or the request ended,
        or `timeout` passed: then it fails with transfer_deadline, as a transfer would)."""
        with self.lock:
            st = self.requests[request_id]
            if not st.finished:
                now = time.time()
                self.engine.prefill_reserved(request_id)
                st.times.update(local_prefill=now, kv_complete=now, admitted=now)
                st.arrived.set()  # no layer will come: the deadline no longer applies
                self._arrivals.wake()
        deadline = time.time() + timeout
        with self.changed:
            while not st.tokens and not st.finished:
                left = deadline - time.time()
                if left <= 0:
                    self._fail(
                        request_id,
                        f"local prefill gave no token within {timeout:.1f} s",
                        TRANSFER_DEADLINE,
                    )
                    break
                self.changed.wait(left)
        return self.poll(request_id, 0, 0)

    def poll(self, request_id: str, since: int, timeout: float = 1.0) -> PollReply:
        """Tokens from index `since` on, waiting up to timeout for news."""
        deadline = time.time() + timeout
        with self.changed:
            st = self.requests[request_id]
            while not st.has_news(since):
                left = deadline - time.time()
                if left <= 0:
                    break
                self.changed.wait(left)
            return st.reply(since)

    def poll_many(self, since: dict[str, int], seen: int, timeout: float = 1.0) -> FeedReply:
        """The news of many requests in one call (the router's token feed, one per decode
        worker, instead of one long poll per request and per step): waits until the worker's
        progress moves past `seen` or one of `since`'s requests has tokens past its index or
        has ended, or `timeout` passes; returns those requests' replies (a request this worker
        does not hold: an error reply) and the progress to pass back as `seen`."""
        deadline = time.time() + timeout
        with self.changed:
            while True:
                news = {
                    rid: st.reply(n) if st is not None else unknown_request_reply(rid)
                    for rid, n in since.items()
                    if (st := self.requests.get(rid)) is None or st.has_news(n)
                }
                left = deadline - time.time()
                if news or self.progress != seen or left <= 0:
                    return FeedReply(self.progress, news)
                self.changed.wait(left)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages. Applied by the step loop before its next step
        (within one step time) so a busy loop cannot starve the caller of the lock."""
        self._aborts.append(request_id)

    def _apply_aborts(self) -> None:
        while self._aborts:
            st = self.requests.get(rid := self._aborts.popleft())
            if st is not None and not st.finished:
                self.engine.abort(rid)
                self._end(st, "abort")

    def release(self, request_id: str) -> None:
        with self.lock:
            self._aborts.append(request_id)
            self._apply_aborts()
            self.requests.pop(request_id, None)
            self._slices.drop(request_id)
            self.engine.release(request_id)
            self._notify()  # a poll_many that still asks about it answers now

    def stats(self) -> DecodeStats:
        with self.lock:
            pool, sch = self.engine.pool, self.engine.scheduler
            return DecodeStats(
                free_pages=pool.num_free,
                used_pages=pool.num_used,
                capacity_pages=pool.capacity,
                running=len(sch.running),
                codec=self.codec,
                incarnation=self.incarnation,
                **worker_cache_fields(self.engine.prefix_cache_stats()),
                waiting=len(sch.waiting),
                reserved=len(sch.reserved),
                dropped_messages=self.dropped_messages,
                decode_kv=self.engine.decode_kv,
                failures=dict(self.failures),
                dead_channels=dict(self.dead_channels),
            )

    def shutdown(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._returns.close()
        self.stall_monitor.stop()
        # never imported: give CUDA-IPC buffers back to their senders
        for kv in self._arrivals.drain():
            done(kv)
        self.trace.flush()
        self.recv_trace.flush()
        self.return_trace.flush()

    # -- internals -------------------------------------------------------------------------
    def _notify(self) -> None:
        """A request's state changed: wake the polls (call with the lock held)."""
        self.progress += 1
        self.changed.notify_all()

    def _fail(self, request_id: str, error: str, reason: str) -> None:
        self.failures[reason] += 1
        st = self.requests[request_id]
        self.engine.abort(request_id)
        st.error = error
        self._end(st, "error")

    def _end(self, st: RequestState, reason: str) -> None:
        st.finished, st.finish_reason = True, reason
        st.times["finished"] = time.time()
        st.arrived.set()
        self._notify()

    def _update(self, st: RequestState, out) -> None:
        if out.token_ids and not st.tokens:
            st.times.setdefault("first_token", time.time())
        if len(out.token_ids) > len(st.tokens) and len(st.tokens) == 1:
            st.times.setdefault("first_decode", time.time())
        st.tokens = list(out.token_ids)
        if out.logprobs is not None:
            st.logprobs, st.top_logprobs = list(out.logprobs), list(out.top_logprobs or [])
        # Streamed text never shows what a stop string will cut: hold back any tail that is
        # the start of a stop string until the next token decides (the final text is exact).
        held = 0 if out.finished or not st.stop else stop_prefix_len(out.text, st.stop)
        st.text = out.text[: len(out.text) - held]
        if out.finished:
            self._end(st, out.finish_reason)

    def _step_loop(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                t_pass = time.time()
                self._apply_aborts()
                imported, waited_ms, recv_ms = self._import_arrivals()
                now = time.time()
                for rid, st in self.requests.items():
                    if not st.finished and not st.arrived.is_set() and now > st.deadline:
                        self._fail(
                            rid,
                            f"KV transfer missed its deadline: {st.layers}/"
                            f"{self.num_layers} layers arrived",
                            TRANSFER_DEADLINE,
                        )
                t_step = time.time()
                outs = []
                try:
                    launched = self.engine.launch_step() if self.engine.has_unfinished() else None
                    if launched is not None:
                        late, late_waited_ms, late_recv_ms = self._import_while_running(launched)
                        imported += late
                        waited_ms = max(waited_ms, late_waited_ms)
                        recv_ms = max(recv_ms, late_recv_ms)
                        outs = self.engine.finish_step(launched)
                except Exception as e:  # never die silently: fail what was running, go on
                    outs = []
                    for rid, st in list(self.requests.items()):
                        if not st.finished and st.arrived.is_set():
                            self._fail(
                                rid, f"decode step failed: {type(e).__name__}: {e}", "decode_step"
                            )
                for out in outs:
                    st = self.requests.get(out.request_id)
                    if st is not None:
                        self._update(st, out)
                if outs:
                    self._notify()
            t_done = time.time()
            self._returns.give_back(imported, self.engine.device)  # after the imports' reads
            if self.trace.on and (outs or imported):
                self.trace.record(
                    t_pass,
                    (t_step - t_pass) * 1e3,
                    len(imported),
                    (t_done - t_step) * 1e3,
                    len(outs),
                    (time.time() - t_done) * 1e3,
                    waited_ms,
                    recv_ms,
                )
            # Sleep outside the lock so callers waiting for it (poll, reserve, admit) get it:
            # Python locks are not fair and this loop would otherwise take it right back.
            if outs:
                time.sleep(0.0005)
            else:  # idle: wake as soon as a layer arrives
                self._arrivals.wait(0.002)
