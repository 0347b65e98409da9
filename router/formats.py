"""The two OpenAI response shapes: text completions and chat completions, whole and as chunks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel
from zipserve.router.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    Usage,
)


class ResponseFormat(Protocol):
    """How one endpoint shapes its answer; `id`, `created` and `model` are fixed per request."""

    endpoint: str

    def first_chunk(self) -> BaseModel | None: ...
    def delta_chunk(self, text: str) -> BaseModel: ...
    def final_chunk(self, finish_reason: str) -> BaseModel: ...
    def usage_chunk(self, usage: Usage) -> BaseModel: ...
    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel: ...


@dataclass(frozen=True)
class CompletionFormat:
    """/v1/completions: object "text_completion", choices[0].text."""

    id: str
    created: int
    model: str
    endpoint: str = "completions"

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None):
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)

    def first_chunk(self) -> None:
        return None

    def delta_chunk(self, text: str) -> CompletionResponse:
        return self._chunk([CompletionChoice(text=text)])

    def final_chunk(self, finish_reason: str) -> CompletionResponse:
        return self._chunk([CompletionChoice(text="", finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self._chunk([], usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> CompletionResponse:
        return self._chunk([CompletionChoice(text=text, finish_reason=finish_reason)], usage)


@dataclass(frozen=True)
class ChatFormat:
    """/v1/chat/completions: object "chat.completion", choices[0].message; chunks carry deltas."""

    id: str
    created: int
    model: str
    endpoint: str = "chat.completions"

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None):
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)

    def first_chunk(self) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta={"role": "assistant", "content": ""})])

    def delta_chunk(self, text: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta={"content": text})])

    def final_chunk(self, finish_reason: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta={}, finish_reason=finish_reason)])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=usage,
            choices=[ChatChoice(message=AssistantMessage(content=text),
                                finish_reason=finish_reason)])
