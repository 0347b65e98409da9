"""What the router hands to the serving side, what it gets back, and the protocol between them.

The router never imports the engine or Ray. It builds a `Job` (token ids + sampling fields),
passes it to a `Backend`, and reads an async stream of `BackendEvent`s:

- `PhaseEvent`: a phase of the request's path (queue, prefill, encode, transfer, decode_queue,
  decode) began (`end is None`) or spans [start, end]; timestamps are `time.time()` seconds.
- `TokenEvent`: one generated token and the text it adds (possibly "", e.g. while a stop string
  might still be forming).
- `FinishEvent`: the last event of every stream: why it ended and the token counts.

A Ray-backed implementation (prefill + decode actors) and `FakeBackend` (tests/fake_backend.py) both
satisfy `Backend`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args, runtime_checkable

PhaseName = Literal["queue", "prefill", "encode", "transfer", "decode_queue", "decode"]
"""The phases of one request's path, in path order."""

PHASES: tuple[str, ...] = get_args(PhaseName)

FinishReason = Literal["stop", "length", "abort", "error"]
"""stop: EOS / stop token / stop string; length: max_tokens or context; abort; error."""

FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)

MAX_TOP_LOGPROBS = 20
"""Most alternatives a job may ask for per token (the engine's limit)."""


@dataclass
class Job:
    """One generation request as the backend sees it (validated by the router already)."""

    id: str
    """Unique job id; the OpenAI response id is derived from it ("cmpl-<id>")."""
    prompt_ids: list[int]
    """Prompt token ids (non-empty)."""
    max_tokens: int
    """Most tokens to generate (>= 1); prompt + max_tokens fits in the model's context."""
    temperature: float = 1.0
    """Sampling temperature (>= 0; 0 is greedy)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    seed: int | None = None
    """Per-request sampler seed."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: the output ends right before the first match (not included)."""
    arrival: float = field(default_factory=time.time)
    """When the router accepted the request (`time.time()`); TTFT and JCT count from here."""
    codec: str | None = None
    """Per-request KV codec override (e.g. "hack"); None: the deployment's default."""
    timeout_s: float | None = None
    """The router ends the job after this many seconds from arrival (None: no limit);
    backends may use it to bound their own waits."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use it to get exactly max_tokens tokens)."""
    min_tokens: int = 0
    """Stop conditions are not honoured before this many tokens (0..max_tokens)."""
    logprobs: int | None = None
    """None: off; k >= 0: each token event carries the sampled token's logprob and the k most
    likely alternatives (k <= MAX_TOP_LOGPROBS)."""

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("id: must be non-empty")
        if not self.prompt_ids:
            raise ValueError("prompt_ids: must be non-empty")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k: must be -1, 0 or >= 1, got {self.top_k}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens: must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if any(not s for s in self.stop):
            raise ValueError("stop: entries must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"logprobs: must be None or in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}"
            )


@dataclass(frozen=True)
class PhaseEvent:
    """A phase began (end None) or ran from start to end (both `time.time()` seconds)."""

    name: PhaseName
    start: float
    end: float | None = None
    kind: Literal["phase"] = field(default="phase", init=False)

    def __post_init__(self) -> None:
        if self.name not in PHASES:
            raise ValueError(f"name: must be one of {PHASES}, got {self.name!r}")
        if self.end is not None and self.end < self.start:
            raise ValueError(f"end: {self.end} is before start {self.start}")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it adds to the output (may be empty)."""

    token_id: int
    text: str
    logprob: float | None = None
    """The token's log-probability, when the job asked for logprobs."""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """The most likely (token id, logprob) alternatives at this position, most likely first
    (as many as the job's `logprobs`)."""
    kind: Literal["token"] = field(default="token", init=False)


@dataclass(frozen=True)
class FinishEvent:
    """The stream's last event."""

    reason: FinishReason
    error: str | None = None
    """Human-readable cause when reason is "error" (or "abort")."""
    prompt_tokens: int | None = None
    """Prompt tokens the backend processed; None: the router uses len(job.prompt_ids)."""
    completion_tokens: int | None = None
    """Tokens generated; None: the router counts the token events."""
    cached_tokens: int | None = None
    """Prompt tokens whose KV the backend reused from its prefix cache instead of computing
    (usage.prompt_tokens_details.cached_tokens); None: the backend does not report it."""
    codec: str | None = None
    """The KV codec actually used, when the backend knows it."""
    kv_bytes: int | None = None
    """KV bytes actually sent from prefill to decode (encoded pages + 16-bit tail), if known."""
    kv_bytes_bf16: int | None = None
    """What the KV sent (the prompt's, less the pages the decode side held) would have taken as
    dense bf16, if known."""
    kv_bytes_not_sent: int | None = None
    """KV bytes (in the codec's wire form) not sent because the decode side held those pages
    already (its prefix cache), if known."""
    kv_cached_tokens: int | None = None
    """Prompt tokens whose KV the decode side held already (so none of it was sent), if known."""
    local_prefill: bool = False
    """The decode side computed the prompt's uncached rest itself (nothing crossed the link)."""
    kv_sent_end: float | None = None
    """When (time.time()) the prefill side handed the last layer to the link, if known: the
    transfer phase splits into sending (until then) and receiving/importing (after)."""
    client_error: bool = False
    """With reason "error": the backend refused a value of the request itself (`error` then
    starts with the field's name, "prompt: ..."), so the router answers 400, not 5xx."""
    kind: Literal["finish"] = field(default="finish", init=False)

    def __post_init__(self) -> None:
        if self.reason not in FINISH_REASONS:
            raise ValueError(f"reason: must be one of {FINISH_REASONS}, got {self.reason!r}")


BackendEvent = PhaseEvent | TokenEvent | FinishEvent


@runtime_checkable
class Backend(Protocol):
    """The serving side as the router sees it."""

    model_name: str
    """The one model served; requests naming another model get 404."""
    max_model_len: int
    """Context length: prompt tokens + max_tokens must fit in it."""
    codecs: tuple[str, ...]
    """The KV codecs served, the default first; a request naming another gets 400."""
    vocab_size: int
    """Prompt token ids must be in [0, vocab_size) (the router refuses others with a 400)."""
    has_tokenizer: bool
    """False: the model is served without a tokenizer (`zipserve serve --skip-tokenizer`):
    prompts are token ids, text prompts, chat messages and stop strings get a 400 naming the
    field, token events carry empty text and completions answer with the token ids."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (called on the event loop: must be fast)."""
        ...

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text for [{"role": ..., "content": str}, ...], ready for `tokenize`."""
        ...

    def token_strings(self, ids: list[int]) -> list[str]:
        """The text of each token on its own (for logprobs; called on the event loop)."""
        ...

    def stream(self, job: Job) -> AsyncIterator[BackendEvent]:
        """Run `job`: phase and token events, always ending with one `FinishEvent`."""
        ...

    async def abort(self, job_id: str) -> None:
        """Stop `job_id` wherever it is and free what it holds; unknown or finished ids: no-op."""
        ...

    def health(self) -> dict:
        """A JSON-able status; a "status" key other than "ok" makes /health answer 503.

        Optional key "workers": a list of {"name": str, "role": "prefill" | "decode",
        "healthy": bool, "codec": str, "free_pages": int, "used_pages": int,
        "queued_tokens": int, "running": int}, one per worker (/metrics and /dashboard show
        them). Called from a worker thread by /metrics and /dashboard/data."""
        ...
