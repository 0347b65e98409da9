"""Workloads for the JCT benchmark: when each request arrives, how long its prompt and output are.

A `Workload` is a list of `WorkloadRequest`s (arrival offset in seconds, prompt token ids, output
tokens), built from one of:

- a built-in shape with Poisson arrivals at `rate` requests/s:
  - `long-doc`: summarization-like; prompts uniform in 4096..16384 tokens, outputs uniform in
    100..400 tokens.
  - `chat`: ShareGPT-like lengths, *synthetic* (no dataset is downloaded or shipped): prompts and
    outputs are log-normal, prompt median 220 tokens (sigma 1.0, clipped to 8..4096), output
    median 190 tokens (sigma 0.8, clipped to 4..1024), roughly the shape of the published
    ShareGPT length histograms (a long tail of long prompts, most answers a few hundred tokens).
  - `shared-prefix`: every prompt starts with one common system prompt of 2000 tokens (the same
    random ids for the whole workload), then its own question, log-normal median 120 tokens
    (sigma 0.8, clipped to 8..1024); outputs median 150 (sigma 0.6, clipped to 4..512). What a
    prefix cache serves from memory after the first request.
- `multiturn` (bench/conversations.py): conversations of 4..8 dependent turns, each prompt the
  whole history so far; `rate` is conversations per second and `num_requests` conversations.
- a trace file (JSONL, one object per line: `arrival_s`, `prompt_tokens`, `output_tokens`),
  replayed at its own arrival times.

`scale` multiplies every length (at least 1 token; prompts at least 2) so the same shape runs
on a CPU with a small model (e.g. `scale=0.02`: long-doc prompts of 82..328 tokens). Prompts are
random token ids in [3, min(vocab, 8000)) (below every special token of the models we serve,
the reference model's 8192-token vocabulary included) and are sent as token-id lists, so the
server sees exactly `prompt_tokens` tokens. Lengths, arrivals and token ids come from separate
seeded streams: the same seed gives the same requests at every rate, only their arrival times
differ. `salt` changes the token ids alone (same lengths, same arrivals): a sweep that replays the
workload on a system it keeps running salts each run, so a worker's prefix cache cannot serve one
run's prompts from an earlier run's (bench/jct_sweep.py).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from zipserve.bench.conversations import CONVERSATION_SHAPES, ConversationWorkload, multiturn

SHAPES = ("long-doc", "chat", "shared-prefix", "multiturn")
"""Built-in shapes: each needs an arrival rate (multiturn: conversations/s)."""
SHARED_PREFIX_TOKENS = 2000
TOKEN_ID_LOW = 3
TOKEN_ID_HIGH = 8000


@dataclass(frozen=True)
class WorkloadRequest:
    index: int
    arrival_s: float
    """Seconds after the start of the replay at which the request is sent."""
    prompt_ids: list[int]
    output_tokens: int
    """Tokens the request asks for (max_tokens = min_tokens, EOS ignored)."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class Workload:
    name: str
    """e.g. "long-doc@2.0/s" or "trace:path"."""
    requests: list[WorkloadRequest]
    seed: int
    rate: float | None
    """Poisson rate (requests/s); None for a trace."""
    scale: float

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("workload: no requests")

    @property
    def duration_s(self) -> float:
        """Arrival time of the last request."""
        return self.requests[-1].arrival_s

    def check_fits(self, max_model_len: int) -> None:
        """Raise ValueError when a request does not fit in the served model's context."""
        worst = max(self.requests, key=lambda r: r.prompt_tokens + r.output_tokens)
        if worst.prompt_tokens + worst.output_tokens > max_model_len:
            raise ValueError(
                f"workload: request {worst.index} needs {worst.prompt_tokens} "
                f"prompt + {worst.output_tokens} output tokens, more than the "
                f"model's context of {max_model_len}; use a smaller --scale"
            )


def _scaled(n: float, scale: float, least: int) -> int:
    return max(least, int(round(n * scale)))


def _lengths(shape: str, rng: random.Random) -> tuple[int, int]:
    if shape == "long-doc":
        return rng.randint(4096, 16384), rng.randint(100, 400)
    if shape == "chat":
        p = min(4096, max(8, int(rng.lognormvariate(math.log(220), 1.0))))
        o = min(1024, max(4, int(rng.lognormvariate(math.log(190), 0.8))))
        return p, o
    if shape == "shared-prefix":  # the question after the common prefix, and the answer
        p = min(1024, max(8, int(rng.lognormvariate(math.log(120), 0.8))))
        o = min(512, max(4, int(rng.lognormvariate(math.log(150), 0.6))))
        return p, o
    raise ValueError(f"workload: unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _prompt(n: int, rng: random.Random, vocab: int) -> list[int]:
    high = min(vocab, TOKEN_ID_HIGH)
    if high <= TOKEN_ID_LOW + 1:
        raise ValueError(f"vocab: {vocab} is too small for random prompts")
    return [rng.randrange(TOKEN_ID_LOW, high) for _ in range(n)]


def poisson(
    shape: str,
    rate: float,
    num_requests: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    vocab: int = TOKEN_ID_HIGH,
    salt: str = "",
) -> Workload:
    """`num_requests` requests of `shape` arriving as a Poisson process of `rate` per second
    (the first at t=0)."""
    if shape in CONVERSATION_SHAPES:
        raise ValueError(f"workload: {shape} is a conversation shape (bench/conversations.py)")
    if rate <= 0:
        raise ValueError(f"rate: must be > 0 requests/s, got {rate}")
    if num_requests < 1:
        raise ValueError(f"num_requests: must be >= 1, got {num_requests}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale: must be in (0, 1], got {scale}")
    lengths_rng, arrivals_rng = random.Random(f"{seed}-lengths"), random.Random(f"{seed}-arr")
    ids_rng = random.Random(f"{seed}-ids{salt}")
    prefix = (
        _prompt(_scaled(SHARED_PREFIX_TOKENS, scale, 1), ids_rng, vocab)
        if shape == "shared-prefix"
        else []
    )
    t, reqs = 0.0, []
    for i in range(num_requests):
        p, o = _lengths(shape, lengths_rng)
        prompt = prefix + _prompt(_scaled(p, scale, 2), ids_rng, vocab)
        reqs.append(WorkloadRequest(i, t, prompt, _scaled(o, scale, 1)))
        t += arrivals_rng.expovariate(rate)
    return Workload(f"{shape}@{rate:g}/s", reqs, seed, rate, scale)


def from_trace(
    path: str | Path,
    *,
    seed: int = 0,
    scale: float = 1.0,
    vocab: int = TOKEN_ID_HIGH,
    limit: int | None = None,
    salt: str = "",
) -> Workload:
    """Requests from a JSONL trace (`arrival_s`, `prompt_tokens`, `output_tokens` per line),
    sorted by arrival and shifted so the first arrives at t=0."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            a, p, o = float(obj["arrival_s"]), int(obj["prompt_tokens"]), int(obj["output_tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"trace: {path}:{lineno}: need arrival_s, prompt_tokens and "
                f"output_tokens numbers ({type(e).__name__}: {e})"
            ) from None
        if a < 0 or p < 1 or o < 1:
            raise ValueError(
                f"trace: {path}:{lineno}: arrival_s must be >= 0 and token counts >= 1"
            )
        rows.append((a, p, o))
    if not rows:
        raise ValueError(f"trace: {path} has no requests")
    rows.sort(key=lambda r: r[0])
    rows = rows[:limit] if limit else rows
    rng = random.Random(f"{seed}-ids{salt}")
    t0 = rows[0][0]
    reqs = [
        WorkloadRequest(i, a - t0, _prompt(_scaled(p, scale, 2), rng, vocab), _scaled(o, scale, 1))
        for i, (a, p, o) in enumerate(rows)
    ]
    return Workload(f"trace:{Path(path).name}", reqs, seed, None, scale)


def build(
    workload: str,
    *,
    rate: float | None,
    num_requests: int,
    seed: int,
    scale: float,
    vocab: int,
    salt: str = "",
) -> Workload | ConversationWorkload:
    """`workload` is a shape name (needs `rate`) or the path of a JSONL trace; `multiturn` is a
    ConversationWorkload of `num_requests` conversations. `salt`: other token ids, same lengths
    and arrivals."""
    if workload in SHAPES:
        if rate is None:
            raise ValueError(f"rate: the {workload} workload needs an arrival rate")
        if workload in CONVERSATION_SHAPES:
            return multiturn(rate, num_requests, seed=seed, scale=scale, vocab=vocab, salt=salt)
        return poisson(workload, rate, num_requests, seed=seed, scale=scale, vocab=vocab, salt=salt)
    if not Path(workload).is_file():
        raise ValueError(
            f"workload: {workload!r} is neither a shape ({', '.join(SHAPES)}) nor a trace file"
        )
    return from_trace(workload, seed=seed, scale=scale, vocab=vocab, limit=num_requests, salt=salt)
