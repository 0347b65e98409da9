"""From a validated OpenAI request to a `Job`: model check, prompt tokens, context-length checks
and sampling defaults. Every refusal is an `OpenAIError` naming the offending field.
"""

from __future__ import annotations

import logging
import time
import uuid

from zipserve.router.backend import Backend, Job
from zipserve.router.errors import OpenAIError
from zipserve.router.limits import AdmissionConfig
from zipserve.router.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
)

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat defaults to the rest of the context."""


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_model(backend: Backend, requested: str | None) -> None:
    if requested is not None and requested != backend.model_name:
        raise OpenAIError(
            404,
            f"model: the model '{requested}' does not exist; this server "
            f"serves '{backend.model_name}'",
            param="model",
            code="model_not_found",
        )


NO_TOKENIZER = "this server runs without a tokenizer (--skip-tokenizer)"


def completion_prompt_ids(backend: Backend, req: CompletionRequest) -> list[int]:
    if isinstance(req.prompt, str):
        if not backend.has_tokenizer:
            raise OpenAIError(
                400,
                f"prompt: {NO_TOKENIZER}; send the prompt as a list of token ids",
                param="prompt",
                code="tokenizer_not_loaded",
            )
        ids = tokenize(backend, req.prompt, "prompt")
    else:
        ids = list(req.prompt)
        check_token_ids(ids, backend.vocab_size)
    if not ids:
        raise OpenAIError(400, "prompt: tokenizes to nothing", param="prompt")
    return ids


def tokenize(backend: Backend, text: str, param: str) -> list[int]:
    """`backend.tokenize(text)`; whatever the tokenizer raises on this input is a 400 naming
    `param` (the input is the client's; a traceback and a 500 help nobody)."""
    try:
        return backend.tokenize(text)
    except Exception as e:
        log.warning("%s: the tokenizer raised %s: %s", param, type(e).__name__, e)
        raise OpenAIError(
            400, f"{param}: the tokenizer cannot encode this text ({type(e).__name__})", param=param
        ) from None


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """A prompt of token ids must stay inside the model's vocabulary (the engine would refuse
    it only after the request waited for pages: refuse it here, at once)."""
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            shown = str(t) if t.bit_length() <= 64 else f"{len(str(t))} digits"
            raise OpenAIError(
                400,
                f"prompt: the token id at index {i} ({shown}) is outside "
                f"this model's vocabulary [0, {vocab_size})",
                param="prompt",
                code="invalid_token_id",
            )


def chat_prompt_ids(backend: Backend, req: ChatCompletionRequest) -> list[int]:
    if not backend.has_tokenizer:
        raise OpenAIError(
            400,
            f"messages: {NO_TOKENIZER}, so it has no chat template; send "
            f"/v1/completions a prompt of token ids",
            param="messages",
            code="tokenizer_not_loaded",
        )
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    try:
        text = backend.apply_chat_template(messages)
    except Exception as e:  # e.g. the template's raise_exception("roles must alternate")
        raise OpenAIError(
            400,
            f"messages: the chat template refused the conversation: {type(e).__name__}: {e}"[:500],
            param="messages",
        ) from None
    ids = tokenize(backend, text, "messages")
    if not ids:
        raise OpenAIError(400, "messages: the conversation tokenizes to nothing", param="messages")
    return ids


def choose_max_tokens(
    requested: int | None,
    default: int | None,
    prompt_len: int,
    max_model_len: int,
    prompt_param: str,
) -> int:
    """Check the context budget; an explicit max_tokens must fit, a default is clamped."""
    room = max_model_len - prompt_len
    if room <= 0:
        raise OpenAIError(
            400,
            f"{prompt_param}: this model's maximum context length is "
            f"{max_model_len} tokens and the prompt has {prompt_len}; "
            f"no room is left to generate",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise OpenAIError(
            400,
            f"max_tokens: {prompt_len} prompt tokens + max_tokens "
            f"{requested} = {prompt_len + requested} exceeds this model's "
            f"maximum context length of {max_model_len} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def build_job(
    backend: Backend,
    req: SamplingRequest,
    prompt_ids: list[int],
    *,
    max_tokens: int | None,
    default_max_tokens: int | None,
    prompt_param: str,
    arrival: float | None = None,
    limits: AdmissionConfig | None = None,
    logprobs: int | None = None,
) -> Job:
    limits = limits or AdmissionConfig()
    limits.check_prompt(len(prompt_ids), prompt_param)
    n = choose_max_tokens(
        max_tokens, default_max_tokens, len(prompt_ids), backend.max_model_len, prompt_param
    )
    if req.stop_list() and not backend.has_tokenizer:
        raise OpenAIError(
            400,
            f"stop: {NO_TOKENIZER}; stop strings need one",
            param="stop",
            code="tokenizer_not_loaded",
        )
    if req.min_tokens is not None and req.min_tokens > n:
        raise OpenAIError(
            400, f"min_tokens: {req.min_tokens} is more than max_tokens {n}", param="min_tokens"
        )
    if req.codec is not None and req.codec not in backend.codecs:
        raise OpenAIError(
            400,
            f"codec: this deployment serves {', '.join(backend.codecs)}; got {req.codec!r}",
            param="codec",
            code="codec_not_served",
        )
    return Job(
        id=new_job_id(),
        prompt_ids=prompt_ids,
        max_tokens=n,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=0 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=req.stop_list(),
        arrival=time.time() if arrival is None else arrival,
        codec=req.codec,
        timeout_s=limits.timeout_for(req.timeout),
        ignore_eos=req.ignore_eos,
        min_tokens=0 if req.min_tokens is None else req.min_tokens,
        logprobs=logprobs,
    )


def admit_completion(
    backend: Backend,
    req: CompletionRequest,
    arrival: float | None = None,
    limits: AdmissionConfig | None = None,
) -> Job:
    """The job for a /v1/completions request (`arrival`: when the request came in)."""
    check_model(backend, req.model)
    ids = completion_prompt_ids(backend, req)
    return build_job(
        backend,
        req,
        ids,
        max_tokens=req.max_tokens,
        default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS,
        prompt_param="prompt",
        arrival=arrival,
        limits=limits,
        logprobs=req.logprobs,
    )


def admit_chat(
    backend: Backend,
    req: ChatCompletionRequest,
    arrival: float | None = None,
    limits: AdmissionConfig | None = None,
) -> Job:
    """The job for a /v1/chat/completions request (`arrival`: when the request came in)."""
    check_model(backend, req.model)
    ids = chat_prompt_ids(backend, req)
    max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    return build_job(
        backend,
        req,
        ids,
        max_tokens=max_tokens,
        default_max_tokens=None,
        prompt_param="messages",
        arrival=arrival,
        limits=limits,
        logprobs=req.top_logprobs_k(),
    )
