"""Which failures of a worker call are the request's own fault, so the client hears a 400 at once.

The engine validates a request where it builds it (`SamplingParams`, the prompt's token ids) and
raises a `ValueError` whose message starts with the offending field: "prompt: token ids [999999]
are outside the vocabulary [0, 8192)". Through Ray it arrives as a `RayTaskError` whose `cause`
is that ValueError. Such a request can never succeed: waiting for pages or retrying it on another
worker pair only holds a queue slot (issue 21: sixteen 20-byte requests blocked a server for
30 s). `request_fault(exc)` returns the message for those and None for everything else (pages
short, a worker dying, a bug), which keep their own handling.
"""

from __future__ import annotations

REQUEST_FIELDS = frozenset(
    {
        "prompt",
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "logprobs",
        "min_tokens",
    }
)
"""Fields of a request as the engine names them in its ValueErrors."""


class RequestRefused(Exception):
    """The engine refused a value of the request (the message names the field)."""


def request_fault(exc: BaseException) -> str | None:
    """The engine's message when `exc` (or, for a Ray task error, its cause) is a ValueError
    about one of the request's fields; else None."""
    cause = getattr(exc, "cause", None) or exc
    if not isinstance(cause, ValueError):
        return None
    message = str(cause)
    field = message.split(":", 1)[0].strip()
    return message if field in REQUEST_FIELDS else None
