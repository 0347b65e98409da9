"""Token logprobs in OpenAI's two shapes, from the backend's token events.

- /v1/completions (`"logprobs": k`): `{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}`, one entry per generated token; top_logprobs maps token text to logprob.
- /v1/chat/completions (`"logprobs": true, "top_logprobs": k`): `{"content": [{"token",
  "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.

A token's text is the tokenizer's decoding of that token alone (`Backend.token_strings`); a
token holding part of a multi-byte character decodes to U+FFFD. Logprobs are those of the
model's raw distribution (before temperature, top-k and top-p), as the engine reports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from zipserve.router.backend import TokenEvent
from zipserve.router.schemas import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

TokenStrings = Callable[[list[int]], list[str]]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _strings(
    events: Sequence[TokenEvent], token_strings: TokenStrings
) -> tuple[list[str], list[list[str]]]:
    """The text of each event's token and of each of its alternatives (one tokenizer call)."""
    ids = [ev.token_id for ev in events]
    for ev in events:
        ids += [t for t, _ in ev.top_logprobs]
    texts = token_strings(ids)
    own, rest = texts[: len(events)], iter(texts[len(events) :])
    return own, [[next(rest) for _ in ev.top_logprobs] for ev in events]


def completion_logprobs(
    events: Sequence[TokenEvent], token_strings: TokenStrings, offset: int = 0
) -> CompletionLogprobs:
    """`offset`: where the first event's token starts in the generated text."""
    own, alts = _strings(events, token_strings)
    offsets = []
    for text in own:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=own,
        token_logprobs=[_finite(ev.logprob) for ev in events],
        top_logprobs=[
            {t: _finite(lp) for t, (_, lp) in zip(texts, ev.top_logprobs)}
            for ev, texts in zip(events, alts)
        ],
        text_offset=offsets,
    )


def chat_logprobs(events: Sequence[TokenEvent], token_strings: TokenStrings) -> ChatLogprobs:
    own, alts = _strings(events, token_strings)
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=text,
                logprob=_finite(ev.logprob),
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=_finite(lp), bytes=list(t.encode()))
                    for t, (_, lp) in zip(texts, ev.top_logprobs)
                ],
            )
            for ev, text, texts in zip(events, own, alts)
        ]
    )
