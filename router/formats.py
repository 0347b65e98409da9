"""The two OpenAI response shapes: text completions and chat completions, whole and as chunks.

A format built with `token_strings` (the request asked for logprobs) adds the logprobs of the
token events it is handed (router/logprobs.py); without it, `logprobs` stays null. A completion
format built with `token_ids` (the server has no tokenizer) adds the events' token ids to each
choice as `token_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from zipserve.router.backend import TokenEvent
from zipserve.router.logprobs import TokenStrings, chat_logprobs, completion_logprobs
from zipserve.router.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)


class ResponseFormat(Protocol):
    """How one endpoint shapes its answer; `id`, `created` and `model` are fixed per request.
    `tokens`: the token events whose text a chunk (or the whole answer) carries."""

    endpoint: str
    token_strings: TokenStrings | None
    token_ids: bool
    """Chunks need the token events (one per token when streaming) even without text."""

    def first_chunk(self) -> BaseModel | None: ...
    def delta_chunk(self, text: str, tokens: Sequence[TokenEvent] = ()) -> BaseModel: ...
    def final_chunk(self, finish_reason: str) -> BaseModel: ...
    def usage_chunk(self, usage: Usage) -> BaseModel: ...
    def whole(
        self, text: str, finish_reason: str, usage: Usage, tokens: Sequence[TokenEvent] = ()
    ) -> BaseModel: ...


@dataclass
class CompletionFormat:
    """/v1/completions: object "text_completion", choices[0].text."""

    id: str
    created: int
    model: str
    token_strings: TokenStrings | None = None
    token_ids: bool = False
    endpoint: str = "completions"
    _offset: int = field(default=0, init=False)
    """text_offset of the next streamed token."""

    def _choice(self, text: str, tokens: Sequence[TokenEvent], finish_reason: str | None = None):
        extra = {"token_ids": [t.token_id for t in tokens]} if self.token_ids else {}
        return CompletionChoice(
            text=text, logprobs=self._logprobs(tokens), finish_reason=finish_reason, **extra
        )

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None):
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _logprobs(self, tokens: Sequence[TokenEvent]) -> CompletionLogprobs | None:
        if self.token_strings is None:
            return None
        lp = completion_logprobs(tokens, self.token_strings, self._offset)
        if self.token_ids:  # no tokenizer: the text is empty, so every token starts at 0
            lp.text_offset = [0] * len(lp.tokens)
        else:
            self._offset += sum(len(t) for t in lp.tokens)
        return lp

    def first_chunk(self) -> None:
        return None

    def delta_chunk(self, text: str, tokens: Sequence[TokenEvent] = ()) -> CompletionResponse:
        return self._chunk([self._choice(text, tokens)])

    def final_chunk(self, finish_reason: str) -> CompletionResponse:
        return self._chunk([CompletionChoice(text="", finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self._chunk([], usage)

    def whole(
        self, text: str, finish_reason: str, usage: Usage, tokens: Sequence[TokenEvent] = ()
    ) -> CompletionResponse:
        return self._chunk([self._choice(text, tokens, finish_reason)], usage)


@dataclass
class ChatFormat:
    """/v1/chat/completions: object "chat.completion", choices[0].message; chunks carry deltas."""

    id: str
    created: int
    model: str
    token_strings: TokenStrings | None = None
    token_ids: bool = False  # chat needs a tokenizer: never set
    endpoint: str = "chat.completions"

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None):
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _logprobs(self, tokens: Sequence[TokenEvent]) -> ChatLogprobs | None:
        return None if self.token_strings is None else chat_logprobs(tokens, self.token_strings)

    def first_chunk(self) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta={"role": "assistant", "content": ""})])

    def delta_chunk(self, text: str, tokens: Sequence[TokenEvent] = ()) -> ChatCompletionChunk:
        return self._chunk(
            [ChatChunkChoice(delta={"content": text}, logprobs=self._logprobs(tokens))]
        )

    def final_chunk(self, finish_reason: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta={}, finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def whole(
        self, text: str, finish_reason: str, usage: Usage, tokens: Sequence[TokenEvent] = ()
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            usage=usage,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=text),
                    logprobs=self._logprobs(tokens),
                    finish_reason=finish_reason,
                )
            ],
        )
