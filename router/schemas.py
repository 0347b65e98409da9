"""Pydantic models of the HTTP API: OpenAI requests and responses, and the router's job views.

Requests accept and ignore fields they do not know (OpenAI clients send many), but a known field
with a wrong type or an out-of-range value is an error: numbers are strict (no "10" for 10, no
true for 1), and every message names the field. None means "default" for every optional field,
as OpenAI clients send explicit nulls.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

StrictInt = Annotated[int, Field(strict=True)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    """OpenAI `stream_options`."""

    include_usage: Annotated[bool, Field(strict=True)] = False
    """Send one more chunk, with empty choices and the usage, before [DONE]."""


class SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    """Must equal the served model's name when given (else 404 model_not_found)."""
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    """Most tokens to generate. Default: 16 for completions, the rest of the context for chat."""
    temperature: Annotated[float, Field(strict=True, ge=0.0, allow_inf_nan=False)] | None = None
    """>= 0; 0 is greedy. Default 1."""
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    """In (0, 1]. Default 1."""
    top_k: Annotated[int, Field(strict=True, ge=-1)] | None = None
    """Extension: keep the k most likely tokens; 0 or -1 disables (default)."""
    seed: StrictInt | None = None
    """Per-request sampler seed."""
    stop: Any = None
    """A string or a list of non-empty strings."""
    stream: Annotated[bool, Field(strict=True)] = False
    """Answer as server-sent events, one chunk per token."""
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None
    """Only 1 is supported."""
    user: Any = None
    """Accepted and ignored."""
    codec: Annotated[str, Field(strict=True, min_length=1, max_length=64)] | None = None
    """Extension: KV codec for this request (e.g. "bf16", "fp8", "hack"); default: deployment's."""
    timeout: Annotated[float, Field(strict=True, gt=0.0, allow_inf_nan=False)] | None = None
    """Extension: seconds after which the job fails with a timeout error (default and upper
    bound: the server's --request-timeout)."""
    ignore_eos: Annotated[bool, Field(strict=True)] = False
    """Extension (as in vLLM): keep generating past EOS, so max_tokens tokens come out."""
    min_tokens: Annotated[int, Field(strict=True, ge=0)] | None = None
    """Extension (as in vLLM): EOS, stop tokens and stop strings are not honoured before this
    many tokens; must not exceed max_tokens."""

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        return stop

    def stop_list(self) -> list[str]:
        """`stop` after validation (always a list)."""
        return list(self.stop or [])


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Any
    """A string, or a list of token ids; a one-element list of either is taken as that prompt."""

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # ["text"] or [[1, 2, 3]]: a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("must not be empty")
            return prompt
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("must not be empty")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                if any(t < 0 for t in prompt):
                    raise ValueError("token ids must be >= 0")
                return prompt
            if all(isinstance(p, (str, list)) for p in prompt):
                raise ValueError("batched prompts are not supported: send one prompt per request")
        raise ValueError("must be a string or a list of token ids")


class ChatMessage(_Request):
    """One chat message; content is a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_content(cls, content: Any) -> str:
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ValueError(
                        'only text parts ({"type": "text", "text": ...}) are supported')
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    """Newer OpenAI name of max_tokens; max_tokens wins when both are given."""


# ----------------------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI error body."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zipserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- job views


class PhaseView(BaseModel):
    name: str
    start: float
    end: float | None
    duration: float | None
    """end - start in seconds; None while the phase runs."""


class TbtSummary(BaseModel):
    """Time between consecutive tokens, seconds."""

    count: int
    mean: float | None
    p50: float | None
    p99: float | None
    max: float | None


class JobView(BaseModel):
    """GET /v1/jobs/{id}: one job's state and timings (seconds; timestamps are time.time())."""

    id: str
    object: Literal["job"] = "job"
    endpoint: str
    model: str
    state: str
    arrival: float
    finished_at: float | None
    phases: list[PhaseView]
    ttft: float | None
    """First token received - arrival."""
    tbt: TbtSummary
    jct: float | None
    """Finish - arrival."""
    prompt_tokens: int
    completion_tokens: int
    codec: str | None
    finish_reason: str | None
    error: str | None
    kv_bytes: int | None = None
    """KV bytes sent from prefill to decode, when the backend reports it."""
    kv_bytes_bf16: int | None = None
    """What the same KV would have taken as dense bf16 (kv_bytes / this: the compression)."""


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
