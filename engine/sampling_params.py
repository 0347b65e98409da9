"""Per-request sampling parameters: one frozen dataclass, validated where it is built.

`SamplingParams` owns what a request asks of the sampler (temperature, top-k, top-p, seed, logprobs)
and of the stop logic (max/min tokens, stop strings, stop token ids, ignore_eos). Every invalid
value raises `ValueError` whose message starts with the field's name, e.g.
"top_p: must be in (0, 1], got 1.5".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_LOGPROBS = 20
"""Largest number of top alternatives a request may ask for."""


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an int, got {value!r}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop."""

    max_tokens: int = 16
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Logits are divided by it before sampling (>= 0; 0 means greedy)."""
    top_k: int = 0
    """Keep only the k most probable tokens (0 or -1: disabled, else >= 1)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest most-probable set whose mass is >= top_p (in (0, 1])."""
    seed: int | None = None
    """Seed of this request's own generator: its samples do not depend on the rest of the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings (a str or a list is accepted); the output is cut right before the first match."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to EOS unless ignore_eos); they are not emitted."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token(s)."""
    logprobs: int | None = None
    """None: off. k >= 0: return the sampled token's logprob and the top-k alternatives (k <= 20)."""
    min_tokens: int = 0
    """EOS, stop tokens and stop strings are not honoured before this many tokens (0..max_tokens)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalization goes through object.__setattr__

        if _int("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")

        temperature = _float("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        set_(self, "temperature", temperature)

        top_k = _int("top_k", self.top_k)
        if top_k < -1:
            raise ValueError(f"top_k: must be 0 or -1 (disabled) or >= 1, got {top_k}")

        top_p = _float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
        set_(self, "top_p", top_p)

        if self.seed is not None and not -(1 << 63) <= _int("seed", self.seed) < (1 << 64):
            # torch.Generator.manual_seed takes no more (and says only "Overflow")
            raise ValueError(f"seed: must be in [-2**63, 2**64), got {self.seed}")

        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop: must be a str or a list of str, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: entries must be non-empty strings, got {s!r}")
        set_(self, "stop", tuple(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids: must be a list of ints, got {ids!r}")
        for t in ids:
            if _int("stop_token_ids", t) < 0:
                raise ValueError(f"stop_token_ids: ids must be >= 0, got {t}")
        set_(self, "stop_token_ids", tuple(ids))

        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be a bool, got {self.ignore_eos!r}")

        if self.logprobs is not None:
            if not 0 <= _int("logprobs", self.logprobs) <= MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs: must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}"
                )

        if not 0 <= _int("min_tokens", self.min_tokens) <= self.max_tokens:
            raise ValueError(
                f"min_tokens: must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )

    @property
    def greedy(self) -> bool:
        """Deterministic argmax decoding: temperature 0 or top_k 1."""
        return self.temperature == 0.0 or self.top_k == 1
