"""What the decode worker keeps per request (RequestState) and answers polls with (PollReply),
and the reasons it counts failures by.

`RequestState.times` records the request's stages on this worker (control/lifecycle.py lines them
up with the router's job states and the engine's sequence states).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from zipserve.compress.wire import ChecksumError
from zipserve.control.messages import PollReply

TRANSFER_DEADLINE = "transfer_deadline"
CHECKSUM_MISMATCH = "checksum_mismatch"


def failure_reason(error: Exception) -> str:
    """checksum_mismatch for the wire's ChecksumError, else kv_rejected."""
    return CHECKSUM_MISMATCH if isinstance(error, ChecksumError) else "kv_rejected"


@dataclass
class RequestState:
    deadline: float
    """time.time() by which all layers must have arrived."""
    layers: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    times: dict[str, float] = field(default_factory=dict)
    """reserved, kv_complete, admitted, first_token, first_decode, finished (time.time);
    local_prefill when this worker computes the prompt's rest itself."""
    stop: tuple[str, ...] = ()
    """Stop strings: text that may still turn into one is held back until it cannot."""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per token, when the request asked for logprobs (else empty)."""
    arrived: threading.Event = field(default_factory=threading.Event)

    def has_news(self, since: int) -> bool:
        """Tokens past index `since`, or the request ended."""
        return self.finished or len(self.tokens) > since

    def reply(self, since: int) -> PollReply:
        """The request from token index `since` on."""
        return PollReply(
            self.tokens[since:],
            self.logprobs[since:],
            self.top_logprobs[since:],
            self.text,
            self.finished,
            self.finish_reason,
            self.error,
            dict(self.times),
        )


def unknown_request_reply(request_id: str) -> PollReply:
    """The reply for a request a decode worker does not hold (released, or never there)."""
    return PollReply(
        [], [], [], "", True, "error", f"request {request_id!r} is not on this decode worker", {}
    )
