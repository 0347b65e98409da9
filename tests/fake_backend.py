"""`FakeBackend`: a deterministic in-process `Backend` for the router tests (no model, no Ray).

- Tokenizer: UTF-8 bytes (token id = byte value), so prompt token counts are byte counts.
- Chat template: "<|role|>\\ncontent\\n" per message, then "<|assistant|>\\n".
- Vocabulary: ids [0, `vocab_size`) (default 4096); `token_strings` gives " t<k>" for id 1000 + k
  and the byte's character below 256.
- Generation: token i is " t<k>" with k = i + (seed or 0), token id 1000 + k; honours
  max_tokens and stop strings (cut right before the first match; text that may still become a
  stop string is held back, so streamed deltas never contain part of one).
- Phases: queue, prefill, encode, transfer, decode_queue back to back from job.arrival, each
  `phase_delay` long, then decode with one token every `token_delay`.
- `has_tokenizer=False`: a server without a tokenizer (the router refuses text; tokens carry empty
  text and `token_strings` gives "token_id:<id>").
- Knobs (plain attributes, change them between requests): `token_delay` (slow it down for
  disconnect tests), `fail_message` + `fail_after_tokens` (finish with an error after that many
  tokens), `phase_delay`, `cached_tokens` / `held_tokens` (prefix-cache hits reported on the
  prefill / decode side).
- Workers (`health()["workers"]`): one prefill ("fake-prefill-0") and one decode worker
  ("fake-decode-0") with a pretend pool of `num_pages` pages of `page_size` tokens: a job holds
  ceil((prompt + generated tokens) / page_size) decode pages from its decode_queue phase to its
  end; queued_tokens counts the prompt tokens of jobs not yet prefilled, running the jobs
  decoding. `unhealthy` (a set of worker names) marks workers unhealthy.
- KV bytes: `FAKE_KV_BYTES_PER_TOKEN` bf16 bytes per prompt token, scaled by the codec's entry in
  `FAKE_CODEC_RATIO` (unknown codecs: 1.0) for the bytes "sent".
- Records: `jobs` (every Job seen), `aborted` (ids passed to `abort`, in order), `abort_event`
  (a threading.Event set on every abort, for tests in another thread), `active` (ids whose stream
  is still running: empty when nothing leaked).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator

from zipserve.router.backend import (
    BackendEvent,
    FinishEvent,
    Job,
    PhaseEvent,
    TokenEvent,
)

PRE_DECODE_PHASES = ("queue", "prefill", "encode", "transfer", "decode_queue")

FAKE_LOGPROB = -0.5
"""The logprob of every fake token (see `fake_logprobs`)."""

FAKE_KV_BYTES_PER_TOKEN = 1024
"""Pretend dense bf16 KV bytes per prompt token (all layers, K and V)."""

FAKE_CODEC_RATIO = {
    "bf16": 1.0,
    "fp8": 0.5,
    "kivi4": 0.28,
    "hack4": 0.27,
    "kivi2": 0.16,
    "hack2": 0.15,
    "lowrank": 0.5,
    "lowrank+hack4": 0.14,
    "lowrank+hack2": 0.08,
}
"""Pretend sent / bf16 bytes per codec."""


def fake_kv_bytes(prompt_tokens: int, codec: str) -> tuple[int, int]:
    """(bytes sent, dense bf16 bytes) FakeBackend reports for a prompt under `codec`."""
    dense = prompt_tokens * FAKE_KV_BYTES_PER_TOKEN
    return math.ceil(dense * FAKE_CODEC_RATIO.get(codec, 1.0)), dense


def fake_logprobs(token_id: int, k: int | None) -> dict:
    """The logprob fields FakeBackend puts on a token event of a job asking for k alternatives."""
    if k is None:
        return {}
    return {
        "logprob": FAKE_LOGPROB,
        "top_logprobs": tuple((token_id + j, FAKE_LOGPROB - j) for j in range(k)),
    }


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop-string match in `text`, if any."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


class FakeBackend:
    """A `Backend` with a byte tokenizer and counting output; see the module docstring."""

    def __init__(
        self,
        *,
        model_name: str = "zipserve-fake",
        max_model_len: int = 256,
        phase_delay: float = 0.001,
        token_delay: float = 0.001,
        codec: str = "bf16",
        num_pages: int = 256,
        page_size: int = 16,
        vocab_size: int = 4096,
        has_tokenizer: bool = True,
    ) -> None:
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.has_tokenizer = has_tokenizer
        self.max_model_len = max_model_len
        self.phase_delay = phase_delay
        self.token_delay = token_delay
        self.codec = codec
        self.codecs = (codec,) + tuple(c for c in FAKE_CODEC_RATIO if c != codec)
        self.fail_message: str | None = None
        self.cached_tokens: int | None = None
        """Set: every finish reports this many prompt tokens (at most the prompt) as served
        from a prefix cache; None: not reported, as a backend without one."""
        self.held_tokens: int | None = None
        """Set: every finish reports this many prompt tokens (at most the prompt) as held by the
        decode side already (kv_cached_tokens; kv_bytes_not_sent their bytes, kv_bytes and
        kv_bytes_bf16 the rest's); None: not reported."""
        self.fail_after_tokens = 0
        self.jobs: list[Job] = []
        self.aborted: list[str] = []
        self.abort_event = threading.Event()
        self.active: set[str] = set()
        self._abort_requested: set[str] = set()
        self.num_pages = num_pages
        self.page_size = page_size
        self.unhealthy: set[str] = set()
        self._prefill_pending: dict[str, int] = {}
        """Job id -> prompt tokens, until prefill ends."""
        self._decode_tokens: dict[str, int] = {}
        """Job id -> tokens held in decode pages (prompt + generated), from decode_queue on."""

    # ----------------------------------------------------------------- Backend protocol

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: list[dict]) -> str:
        turns = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return turns + "<|assistant|>\n"

    def token_strings(self, ids: list[int]) -> list[str]:
        if not self.has_tokenizer:
            return [f"token_id:{i}" for i in ids]
        return [
            f" t{i - 1000}"
            if i >= 1000
            else bytes([i]).decode("utf-8", "replace")
            if i < 256
            else ""
            for i in ids
        ]

    async def abort(self, job_id: str) -> None:
        self._abort_requested.add(job_id)
        self.aborted.append(job_id)
        self.abort_event.set()

    def health(self) -> dict:
        used = sum(math.ceil(n / self.page_size) for n in self._decode_tokens.values())
        workers = [
            {
                "name": "fake-prefill-0",
                "role": "prefill",
                "codec": self.codec,
                "free_pages": 0,
                "used_pages": 0,
                "queued_tokens": sum(self._prefill_pending.values()),
                "running": len(self._prefill_pending),
            },
            {
                "name": "fake-decode-0",
                "role": "decode",
                "codec": self.codec,
                "free_pages": self.num_pages - used,
                "used_pages": used,
                "queued_tokens": 0,
                "running": len(self._decode_tokens),
            },
        ]
        for w in workers:
            w["healthy"] = w["name"] not in self.unhealthy
        return {
            "status": "ok",
            "model": self.model_name,
            "max_model_len": self.max_model_len,
            "codec": self.codec,
            "active_jobs": len(self.active),
            "workers": workers,
        }

    async def stream(self, job: Job) -> AsyncIterator[BackendEvent]:
        self.jobs.append(job)
        self.active.add(job.id)
        self._prefill_pending[job.id] = len(job.prompt_ids)
        try:
            async for ev in self._run(job):
                yield ev
        finally:
            self.active.discard(job.id)
            self._abort_requested.discard(job.id)
            self._prefill_pending.pop(job.id, None)
            self._decode_tokens.pop(job.id, None)

    # ----------------------------------------------------------------- generation

    def _finish(self, job: Job, reason: str, tokens: int, error: str | None = None):
        codec = job.codec or self.codec
        n = len(job.prompt_ids)
        held = None if self.held_tokens is None else min(self.held_tokens, n)
        sent, dense = (
            fake_kv_bytes(n - (held or 0), codec) if job.id in self._decode_tokens else (None, None)
        )
        not_sent = None
        if held is not None and sent is not None:
            not_sent = fake_kv_bytes(n, codec)[0] - sent
        return FinishEvent(
            reason=reason,
            error=error,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=tokens,
            cached_tokens=(
                None if self.cached_tokens is None else min(self.cached_tokens, len(job.prompt_ids))
            ),
            codec=codec,
            kv_bytes=sent,
            kv_bytes_bf16=dense,
            kv_cached_tokens=held,
            kv_bytes_not_sent=not_sent,
        )

    async def _run(self, job: Job) -> AsyncIterator[BackendEvent]:
        t = job.arrival
        for name in PRE_DECODE_PHASES:
            await asyncio.sleep(self.phase_delay)
            now = time.time()
            yield PhaseEvent(name, t, max(now, t))
            t = max(now, t)
            if name == "prefill":
                self._prefill_pending.pop(job.id, None)
            elif name == "transfer":  # the KV sits in decode pages from here on
                self._decode_tokens[job.id] = len(job.prompt_ids)
            if job.id in self._abort_requested:
                yield self._finish(job, "abort", 0, "aborted")
                return

        decode_start, text, sent, n = t, "", 0, 0
        reason, error = "length", None
        while n < job.max_tokens:
            if self.fail_message is not None and n >= self.fail_after_tokens:
                reason, error = "error", self.fail_message
                break
            await asyncio.sleep(self.token_delay)
            if job.id in self._abort_requested:
                reason, error = "abort", "aborted"
                break
            k = n + (job.seed or 0)
            text += f" t{k}" if self.has_tokenizer else ""
            n += 1
            self._decode_tokens[job.id] = len(job.prompt_ids) + n
            cut = first_stop(text, job.stop) if n >= job.min_tokens else None
            if cut is not None:
                yield TokenEvent(1000 + k, text[sent:cut], **fake_logprobs(1000 + k, job.logprobs))
                reason = "stop"
                break
            keep = held_back(text, job.stop) if n < job.max_tokens else 0
            yield TokenEvent(
                1000 + k, text[sent : len(text) - keep], **fake_logprobs(1000 + k, job.logprobs)
            )
            sent = len(text) - keep
        yield PhaseEvent("decode", decode_start, max(time.time(), decode_start))
        yield self._finish(job, reason, n, error)
