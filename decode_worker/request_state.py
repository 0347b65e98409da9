"""What the decode worker keeps per request (RequestState), and the reasons it counts failures by.

`RequestState.times` records the request's stages on this worker (control/lifecycle.py lines them
up with the router's job states and the engine's sequence states).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from zipserve.compress.wire import ChecksumError

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
