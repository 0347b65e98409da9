"""Pydantic models of the HTTP API: OpenAI requests and responses, and the router's job views.

Requests accept and ignore fields they do not know (OpenAI clients send many), but a known field
with a wrong type or an out-of-range value is an error: numbers are strict (no "10" for 10, no
true for 1), and every message names the field. None means "default" for every optional field,
as OpenAI clients send explicit nulls. OpenAI fields this server cannot honour (`echo`,
`best_of` > 1, penalties, `logit_bias`, `suffix`, tools, non-text `response_format`) are
accepted at their defaults only: any other value is a 400 naming the field, never silently
ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from zipserve.router.backend import MAX_TOP_LOGPROBS

StrictInt = Annotated[int, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
TopLogprobs = Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)]

SEED_RANGE = (-(1 << 63), (1 << 63) - 1)
"""A seed is a 64-bit signed integer (as in vLLM); the engine's generators take no more."""


def _unsupported(what: str) -> ValueError:
    return ValueError(f"{what} is not supported by this server")


def _only_default(value: Any, default_ok: tuple, what: str) -> Any:
    """`value` if it is None or one of the values meaning "off", else a ValueError."""
    if value is None or any(value == d and type(value) is type(d) for d in default_ok):
        return value
    raise _unsupported(what)


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
    """Only with "stream": true (as OpenAI: a 400 otherwise)."""
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

    presence_penalty: Any = None
    """Only 0 (the default)."""
    frequency_penalty: Any = None
    """Only 0 (the default)."""
    logit_bias: Any = None
    """Only empty (the default)."""

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, seed: int | None) -> int | None:
        lo, hi = SEED_RANGE
        if seed is not None and not lo <= seed <= hi:
            raise ValueError(f"must be a 64-bit signed integer, in [{lo}, {hi}]")
        return seed

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(
        cls, opts: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if opts is not None and info.data.get("stream") is False:
            raise ValueError('only allowed with "stream": true')
        return opts

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: Any, info: ValidationInfo) -> Any:
        return _only_default(value, (0, 0.0), f"a non-zero {info.field_name}")

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: Any) -> Any:
        return _only_default(value, ({},), "logit_bias")

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
    logprobs: TopLogprobs | None = None
    """The sampled tokens' logprobs and this many most likely alternatives per position
    (0..20; None: off)."""
    echo: StrictBool = False
    """Only false: returning the prompt is not supported."""
    best_of: StrictInt | None = None
    """Only 1."""
    suffix: Any = None
    """Only empty: insertion is not supported."""

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise _unsupported("returning the prompt with the completion")
        return echo

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of != 1:
            raise ValueError(f"only best_of=1 is supported, got {best_of}")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: Any) -> Any:
        return _only_default(suffix, ("",), "a suffix (insertion)")

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
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        'only text parts ({"type": "text", "text": ...}) are supported'
                    )
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    """Newer OpenAI name of max_tokens; max_tokens wins when both are given."""
    logprobs: StrictBool | None = None
    """Return the sampled tokens' logprobs."""
    top_logprobs: TopLogprobs | None = None
    """With logprobs: this many most likely alternatives per position (0..20)."""
    tools: Any = None
    """Only empty: tool calls are not supported."""
    functions: Any = None
    """Only empty: function calls are not supported."""
    tool_choice: Any = None
    """Only "none" or "auto" (there are no tools)."""
    function_call: Any = None
    """Only "none" or "auto"."""
    response_format: Any = None
    """Only {"type": "text"}."""

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and info.data.get("logprobs") is not True:
            raise ValueError('only allowed with "logprobs": true')
        return top

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: Any, info: ValidationInfo) -> Any:
        return _only_default(value, ([],), "tool or function calling")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        return _only_default(value, ("none", "auto"), f"{info.field_name} {value!r}"[:80])

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _only_default(value, ({"type": "text"},), "a response_format other than text")

    def top_logprobs_k(self) -> int | None:
        """The job's `logprobs`: None when off, else the alternatives per position."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ----------------------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI error body."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    """Present when the backend reports its prefix-cache hits (OpenAI's shape)."""

    @model_serializer(mode="wrap")
    def _drop_unreported(self, handler):
        out = handler(self)
        if out.get("prompt_tokens_details") is None:
            out.pop("prompt_tokens_details", None)
        return out


class CompletionLogprobs(BaseModel):
    """/v1/completions `logprobs`: one entry per generated token (OpenAI's legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None]]
    text_offset: list[int]
    """Where each token starts in the generated text (characters)."""


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """/v1/chat/completions `logprobs`."""

    content: list[TokenLogprob]


class CompletionChoice(BaseModel):
    """A server without a tokenizer adds `token_ids` (the generated ids; vLLM's name), present
    only then."""

    model_config = ConfigDict(extra="allow")

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    cached_tokens: int | None = None
    """Prompt tokens whose KV the prefill side took from its prefix cache instead of computing
    (usage.prompt_tokens_details.cached_tokens), when the backend reports it."""
    kv_cached_tokens: int | None = None
    """Prompt tokens whose KV the decode side held already (not sent), when reported."""
    kv_bytes_not_sent: int | None = None
    """KV bytes not sent because the decode side held those pages, when reported."""
    local_prefill: bool = False
    """The decode side computed the prompt's uncached rest itself: no prefill worker ran and
    no KV crossed the link."""
    kv_sent_end: float | None = None
    """When (Unix time) the prefill side handed the last layer to the link, when reported: the
    transfer phase before it is sending, after it receiving and importing."""


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
