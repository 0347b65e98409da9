"""The typed messages of the control plane: what workers answer the backend, and what the backend
answers the router's /health.

Worker -> backend (Ray actor calls): `WorkerInfo` (info()), `PrefillStats` / `DecodeStats`
(stats(), every health interval), `Reservation` (a decode worker's reserve()), `PollReply` (a
decode worker's admit() and poll()).
Backend -> router: `HealthReport` (one codec's workers) and `MultiCodecHealth` (several codecs);
`to_json()` is the dict /health serves, field for field in this order (the router and
dashboards read it as JSON, so a field's name, place and value are its API).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker is: the keys a KV pair must agree on, and its device."""

    model: str
    codec: str
    page_size: int
    num_layers: int
    """Layers whose KV crosses the channel."""
    device: str
    decode_kv: str | None = None
    """A decode worker's decode_kv, `auto` resolved (engine/decode_kv.py); None for prefill."""
    decode_kv_reason: str | None = None
    """Why the decode worker keeps that form (what `auto` weighed; "asked for" otherwise)."""

    def hello(self) -> dict:
        """The dict transfer.pairing.connect_pair checks against the peer's."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class WorkerStats:
    """What every worker reports each health interval."""

    free_pages: int
    used_pages: int
    capacity_pages: int
    running: int
    """Decode: sequences in the batch; prefill: 1 while a prompt runs."""
    codec: str
    incarnation: str
    """New each time the worker is built: a restarted actor is told apart by it."""
    cached_pages: int = 0
    """Pages its prefix cache maps now (held by requests, or free but reusable)."""
    cache_lookup_tokens: int = 0
    """Prompt tokens of the requests that looked their prefix up, since the worker started."""
    cache_hit_tokens: int = 0
    """Of those, tokens whose KV came from the prefix cache (prefill: not computed; decode: not
    received)."""


@dataclass(frozen=True)
class PrefillStats(WorkerStats):
    prefills: int = 0
    """Prompts run so far."""
    out_of_memory: int = 0
    """Prefills that ran out of GPU memory (each retried once)."""


@dataclass(frozen=True)
class DecodeStats(WorkerStats):
    waiting: int = 0
    reserved: int = 0
    """Requests holding pages whose KV has not all arrived (engine SeqStatus.RESERVED)."""
    dropped_messages: int = 0
    decode_kv: str = "compressed"
    failures: dict[str, int] = field(default_factory=dict)
    """transfer_deadline, checksum_mismatch, kv_rejected, kv_import, decode_step: counts."""
    dead_channels: dict[str, str] = field(default_factory=dict)
    """Prefill peer id -> name of its channel, for channels whose transport broke."""


@dataclass(frozen=True)
class Reservation:
    """A decode worker's answer to reserve(): the request holds pages and a slot."""

    held_pages: int = 0
    """Leading full pages of the prompt the worker already holds (its prefix cache, by chained
    hash): the prefill side sends only the pages after them."""
    page_size: int = 64

    @property
    def held_tokens(self) -> int:
        return self.held_pages * self.page_size


@dataclass(frozen=True)
class PollReply:
    """A decode worker's view of one request: tokens from the index asked for on."""

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    text: str
    """The whole text so far (held back while it may still become a stop string)."""
    finished: bool
    finish_reason: str | None
    error: str | None
    times: dict[str, float]
    """reserved, kv_complete, admitted, first_decode, finished (time.time), as reached."""


@dataclass(frozen=True)
class FeedReply:
    """A decode worker's answer to one poll for many requests (DecodeWorker.poll_many)."""

    progress: int
    """The worker's progress count when it answered (pass it back as `seen`)."""
    replies: dict[str, PollReply]
    """The requests asked about that have news: tokens past the index asked for, or an end."""


@dataclass(frozen=True)
class WorkerHealth:
    """One worker in /health (and, through it, /metrics and the dashboard)."""

    name: str
    role: Literal["prefill", "decode"]
    healthy: bool
    codec: str
    decode_kv: str | None
    free_pages: int
    used_pages: int
    queued_tokens: int
    """Prefill: prompt tokens it is running or about to; decode: reserved tokens whose KV is
    not in yet."""
    running: int
    restarts: int
    dead: bool
    error: str | None
    cached_pages: int = 0
    """Pages its prefix cache maps (held, or free but reusable)."""
    cache_hit_rate: float | None = None
    """Prompt tokens served from its prefix cache / prompt tokens looked up, since it started
    (None before the first lookup)."""


@dataclass(frozen=True)
class HealthReport:
    """One codec's deployment."""

    status: Literal["ok", "unavailable"]
    """ok while some prefill/decode pair can take a job."""
    codec: str
    decode_kv: str
    device: str
    workers: list[WorkerHealth]
    pairs: dict[str, bool]
    """"prefill-i/decode-j" -> whether jobs can be routed to that pair now."""
    degraded: bool
    """Some worker is unhealthy."""
    failures: dict[str, int]
    events: dict[str, int]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MultiCodecHealth:
    """Several codecs, each a lane of its own workers (control/multi_codec.py)."""

    status: Literal["ok", "unavailable"]
    """ok while any lane can serve."""
    codec: str
    """The default codec."""
    codecs: list[str]
    device: str
    workers: list[WorkerHealth]
    """Every lane's workers, named codec/role-i."""
    pairs: dict[str, dict[str, bool]]
    """codec -> that lane's pairs (as HealthReport.pairs)."""
    degraded: bool
    failures: dict[str, int]
    events: dict[str, int]
    lanes: dict[str, str]
    """codec -> that lane's status."""
    decode_kv: str
    lane_decode_kv: dict[str, str]

    def to_json(self) -> dict:
        return asdict(self)
