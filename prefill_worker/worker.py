"""PrefillWorker: runs one prompt at a time and streams its KV to the paired decode worker.

Plain Python (control/ wraps it as a Ray actor; it answers with control/messages.py's types and
`PrefillReport`). Each layer's KV is handed to the channel's sender thread the moment the model
has stored it, so the transfer of layer l overlaps the compute of layer l+1. Forward passes run
one at a time (a lock), but a prompt's sends do not hold that lock: the next prompt computes
while the previous one's KV is still on the link (two KV slots: one prompt's KV sending, the next
one's being computed; a third prompt waits for a slot). One sender thread per channel keeps every
prompt's layers in order behind the previous prompt's. The actor takes calls concurrently: stats
and health checks answer while a prefill runs. `incarnation` is new each time the worker is
built, so a restarted actor is told apart from the one before it.
On CUDA, over a channel that carries device tensors (in-process, CUDA IPC, NCCL), layers leave as
device buffers and never touch host memory (transfer/kv_messages.py picks the form).
With a prefix cache (on by default) a prompt computes only what the worker's cache does not hold,
and `first_page` (the pages the decode worker said it holds when it reserved) leaves those pages
out of every layer sent (a delta transfer, engine/kv_export.py).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from zipserve.compress.wire import LayerKV
from zipserve.control.gil_switch import apply_worker_switch_interval
from zipserve.control.messages import PrefillStats, WorkerInfo
from zipserve.control.stall_monitor import StallMonitor
from zipserve.engine.disaggregated import DisaggregatedEngine, Overloaded
from zipserve.engine.prefix_cache import worker_cache_fields
from zipserve.engine.sampling_params import SamplingParams
from zipserve.prefill_worker.send_trace import END_LAYER, SendTrace
from zipserve.transfer.channel import Channel
from zipserve.transfer.kv_messages import send_layer, use_device_form
from zipserve.transfer.link import LinkEmulator, LinkUsage, unshaped
from zipserve.transfer.pairing import connect_pair, local_endpoint

KV_TAG = 1
OOM_WAIT_S = 5.0
"""Out of GPU memory, how long a prefill waits for its KV in flight to be taken, then retries."""
FLUSH_TIMEOUT_S = 120.0
"""How long a prompt's last layer may take to leave a shaped link's queue (its slot and those
queued before it, then the hand-off; the transports' own timeouts come first)."""


@dataclass
class PrefillReport:
    request_id: str
    first_token: int
    first_logprob: float | None
    prefill_start: float
    prefill_end: float
    """Wall-clock (time.time) bounds of the forward pass incl. encoding."""
    send_end: float
    """When the last layer had left for the decode worker."""
    bytes_sent: int
    dense_bytes: int
    """What the same KV takes uncompressed in the engine's dtype (bf16 on GPU, fp32 on CPU)."""
    exchange_bytes: int = 0
    """Bytes a prefill group's all-to-alls moved between its workers (0: one worker)."""
    first_top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    """The first token's most likely alternatives (when the request asked for logprobs)."""
    cached_tokens: int = 0
    """Prompt tokens whose KV came from this worker's prefix cache instead of being computed."""
    bytes_not_sent: int = 0
    """Wire bytes of the pages the decode worker held already (first_page), left out."""
    first_page: int = 0
    """Full pages of the prompt left out of every layer sent (the decode worker held them)."""
    local: bool = False
    """The decode worker computed the prompt's uncached rest itself (no prefill worker ran,
    nothing was sent); control/lifecycle.py builds such a report from its clock."""


KV_SLOTS = 2
"""Prompts in prefill() at once: one computing, one whose layers are still leaving."""
INFLIGHT_ENV = "ZIPSERVE_KV_INFLIGHT_PROMPTS"
"""How many of the largest prompt's KV may wait unacknowledged by the decode worker (CUDA IPC)
before sends wait; the warm-up holds one more (the prompt being computed). Default 1; 2 is for
A/B runs (runbook trace26): does the sender's wait for acknowledgements make layers late?"""


def kv_inflight_prompts(value: str | None = None) -> int:
    """INFLIGHT_ENV (value: instead of the environment): a whole number >= 1, default 1.
    Raises ValueError naming the variable for anything else."""
    raw = (os.environ.get(INFLIGHT_ENV, "") if value is None else value).strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1 or not raw.isascii():
        raise ValueError(f"{INFLIGHT_ENV}: expected a whole number >= 1, got {raw!r}")
    return n


class _Sends:
    """What one prompt's sends came to: bytes, the first error, and when the last layer left."""

    def __init__(self, request_id: str = "") -> None:
        self.request_id = request_id
        self.bytes = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.end = 0.0


class _ChannelSender:
    """One thread per channel that sends queued layers in arrival order: every layer of a prompt
    leaves before any layer of the prompt queued after it. A layer of a prompt whose earlier
    layer failed is skipped; the failure is the prompt's, not the channel's. With `trace` on,
    each layer sent and each prompt's end leave a row there (prefill_worker/send_trace.py)."""

    def __init__(self, name: str, trace: SendTrace | None = None) -> None:
        self._queue: queue.Queue[tuple[Channel, LayerKV | None, _Sends, float] | None] = (
            queue.Queue()
        )
        self._trace = trace if trace is not None and trace.on else None
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{name}", daemon=True)
        self._thread.start()

    def put(self, channel: Channel, kv: LayerKV | None, sends: _Sends) -> None:
        """Queue one layer (None: the prompt's last layer was queued before this)."""
        self._queue.put((channel, kv, sends, time.time()))

    def close(self, timeout: float) -> bool:
        """Send what is queued, then stop the thread; False if it had not stopped in `timeout`
        seconds (a send still blocked on its peer)."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            channel, kv, sends, queued_s = item
            taken_s = time.time()
            if kv is None:
                try:  # a shaped link hands messages over after their slot: wait for the last
                    channel.flush(timeout=FLUSH_TIMEOUT_S)
                except Exception as e:  # a hand-off of this prompt's layers failed
                    sends.error = sends.error or e
                sends.end = time.time()
                sends.done.set()
                if self._trace is not None:
                    end_ms = 1e3 * (sends.end - taken_s)
                    self._trace.sent(
                        sends.request_id, END_LAYER, 0, queued_s, taken_s, 0, 0, end_ms
                    )
                    self._trace.flush()  # the actor is killed, not shut down: write per prompt
            elif sends.error is None:
                timing: dict[str, float] = {}
                acked_before, exported_before = channel.ack_wait_s, channel.export_s
                cpu_before = time.thread_time()
                try:
                    nbytes = send_layer(channel, kv, KV_TAG, timing)
                except Exception as e:  # surfaced to the prompt's caller
                    sends.error = e
                    continue
                sends.bytes += nbytes
                if self._trace is not None:
                    ack_ms = 1e3 * (channel.ack_wait_s - acked_before)
                    export_ms = 1e3 * (channel.export_s - exported_before)
                    self._trace.sent(
                        sends.request_id,
                        kv.layer,
                        nbytes,
                        queued_s,
                        taken_s,
                        timing["ready_ms"],
                        ack_ms,
                        max(0.0, timing["send_ms"] - ack_ms - export_ms),
                        1e3 * (time.thread_time() - cpu_before),
                        export_ms=export_ms,
                    )


class PrefillWorker:
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
        self.max_inflight_bytes: int | None = None
        """Cap on KV sent but not yet taken by the decode side (CUDA IPC), set by the warm-up."""
        if self.engine.device.type == "cuda":
            # Hold the memory of the largest prompt's activations and of n + 1 prompts' exported
            # KV (n in flight to the decode worker, the next being computed) from the start,
            # and never let more than n prompts' KV wait unacknowledged (n: INFLIGHT_ENV, 1).
            n = kv_inflight_prompts()
            warm = self.engine.warm_up_prefill(
                self.engine.engine_config.max_prefill_tokens, device_form=True, held=n + 1
            )
            self.max_inflight_bytes = max(n * warm.kv_bytes, 1)
        self.channels: dict[str, Channel] = {}
        self.incarnation = uuid.uuid4().hex
        self._busy = threading.Lock()
        """Held for a forward pass (one at a time on the engine)."""
        self._kv_slots = threading.BoundedSemaphore(KV_SLOTS)
        self._senders: dict[str, _ChannelSender] = {}
        self.send_trace = SendTrace(tag=codec)
        """Off unless ZIPSERVE_STEP_TRACE names a folder (prefill_worker/send_trace.py)."""
        self.stall_monitor = StallMonitor("prefill", tag=codec)
        """When this process ran no Python (same switch; control/stall_monitor.py)."""
        self.prefills = 0
        self.out_of_memory = 0

    def info(self) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(
            e.model_name,
            self.codec,
            e.engine_config.page_size,
            e.config.num_kv_layers,
            str(e.device),
        )

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
        )

    def attach(self, decode_id: str, channel: Channel) -> None:
        if self.max_inflight_bytes is not None:
            channel.limit_inflight(self.max_inflight_bytes)  # sends wait beyond it
        old, self.channels[decode_id] = self.channels.get(decode_id), channel
        if old is not None:  # replaced after a peer restart: close it off the caller's path
            threading.Thread(target=old.close, daemon=True).start()

    def endpoint(self) -> dict:
        """This worker's Ray node and a free port on it (see transfer.pairing.local_endpoint)."""
        return local_endpoint()

    def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        decode_id: str,
        first_page: int = 0,
    ) -> PrefillReport:
        """Run the prompt and return once its last layer has left for `decode_id`, without the
        first `first_page` full pages (the decode worker holds them). The forward pass holds the
        engine; the sends do not, so the next prompt computes meanwhile."""
        with self._kv_slots:
            channel = self.channels[decode_id]
            sender = self._senders.get(decode_id)
            if sender is None:
                sender = self._senders[decode_id] = _ChannelSender(decode_id, self.send_trace)
            sends = _Sends(request_id)
            with self._busy:
                self.prefills += 1
                t0 = time.time()
                try:
                    res = self._run_prefill(
                        request_id,
                        prompt_ids,
                        params,
                        lambda kv: sender.put(channel, kv, sends),
                        use_device_form(channel, self.engine.device),
                        channel,
                        first_page,
                    )
                finally:
                    sender.put(channel, None, sends)
            sends.done.wait()
        if sends.error is not None:
            raise sends.error
        cfg = self.engine.config
        return PrefillReport(
            request_id,
            res.first_token,
            res.first_logprob,
            t0,
            t0 + res.prefill_seconds,
            sends.end,
            sends.bytes,
            len(prompt_ids)
            * cfg.kv_bytes_per_token(torch.empty((), dtype=self.engine.dtype).element_size()),
            first_top_logprobs=res.first_top_logprobs,
            cached_tokens=res.cached_tokens,
            bytes_not_sent=res.bytes_not_sent,
            first_page=first_page,
        )

    def _run_prefill(
        self,
        request_id,
        prompt_ids,
        params,
        on_layer,
        device_form: bool,
        channel: Channel,
        first_page: int = 0,
    ):
        """The forward pass; out of GPU memory, it waits for the KV still held by the decode
        side to come back and tries once more, then refuses the request as Overloaded (a 503
        for the client, the worker stays up)."""
        for attempt in range(2):
            try:
                return self.engine.prefill_export(
                    prompt_ids,
                    params,
                    request_id,
                    on_layer=on_layer,
                    device_form=device_form,
                    first_page=first_page,
                )
            except torch.cuda.OutOfMemoryError as e:
                self.out_of_memory += 1
                if attempt:
                    raise Overloaded(
                        f"prefill: out of GPU memory for {len(prompt_ids)} "
                        f"tokens right now ({e})".splitlines()[0]
                    ) from e
                channel.wait_acked(OOM_WAIT_S)

    def shutdown(self, timeout: float = 10.0) -> list[str]:
        """Let the queued sends leave, stop the sender threads and the stall monitor, write the
        send trace and close every KV channel. Returns the peers whose sender was still blocked
        after `timeout` seconds (their channel is closed anyway)."""
        stuck = [peer for peer, s in self._senders.items() if not s.close(timeout)]
        self._senders.clear()
        self.stall_monitor.stop()
        self.send_trace.flush()
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()
        return stuck

    def set_link(self, gbps: float | None, latency_ms: float = 0.0) -> None:
        """Re-shape the sends of every KV channel like a link of `gbps` (None: unlimited) and
        `latency_ms`. Only between requests: benchmarks sweep links on one running system.
        Every channel is re-shaped; then a hand-off the old shaping had left unreported (or
        that did not end in time) is raised, naming its peer."""
        failures: list[tuple[object, Exception]] = []
        for peer, ch in list(self.channels.items()):
            if isinstance(ch, LinkEmulator):
                try:
                    ch.detach()  # its courier hands over what is queued, then stops
                except Exception as e:  # noqa: BLE001 - raised below, once all are re-shaped
                    failures.append((peer, e))
            inner = unshaped(ch)
            self.channels[peer] = (
                LinkEmulator(inner, gbps, latency_ms, history_s=3600.0)
                if gbps or latency_ms
                else inner
            )
        if failures:
            peer, first = failures[0]
            raise RuntimeError(
                f"KV link to {peer}: the old link shaping's last hand-off failed: {first}"
            ) from first

    def link_usage(self, window_s: float) -> LinkUsage | None:
        """Mean busy and hand-off fractions of the emulated links over the last `window_s`
        seconds (None when no link is emulated)."""
        return LinkUsage.mean(
            [
                ch.usage(window_s)
                for ch in self.channels.values()
                if isinstance(ch, LinkEmulator) and ch.gbps is not None
            ]
        )

    def stats(self) -> PrefillStats:
        pool = self.engine.pool
        return PrefillStats(
            free_pages=pool.num_free,
            used_pages=pool.num_used,
            capacity_pages=pool.capacity,
            running=int(self._busy.locked()),
            codec=self.codec,
            incarnation=self.incarnation,
            **worker_cache_fields(self.engine.prefix_cache_stats()),
            prefills=self.prefills,
            out_of_memory=self.out_of_memory,
        )
