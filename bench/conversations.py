"""Multi-turn conversations for the JCT benchmark (`--workload multiturn`): what prefix caching is
for. Each conversation arrives as a Poisson process of `rate` conversations per second and runs
4..8 turns in order; a turn's prompt is the whole history so far (the previous turn's prompt, the
answer the server gave to it, and the new user text), and turn n+1 is sent as soon as turn n's
answer is complete (bench/jct_conversations.py replays them, several conversations at once).

Lengths (`scale` 1; each scaled like every workload, at least 1 token): the first user message
(a system prompt and a question) log-normal with median 400 tokens (sigma 0.6, clipped to
64..2048), every later user message median 120 (sigma 0.8, clipped to 8..1024), every answer
median 180 (sigma 0.6, clipped to 16..1024); synthetic, like the chat shape (no dataset is
shipped). Token ids are random in [3, min(vocab, 8000)) as in bench/workloads.py; the answers
come from the server, so prompts after the first turn are only known while replaying.
Lengths, turn counts and arrivals come from separate seeded streams.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

CONVERSATION_SHAPES = ("multiturn",)
MIN_TURNS, MAX_TURNS = 4, 8


@dataclass(frozen=True)
class Turn:
    user_ids: list[int]
    """The new user text of this turn (appended to the history)."""
    output_tokens: int
    """Tokens the answer has (max_tokens = min_tokens, EOS ignored)."""


@dataclass(frozen=True)
class Conversation:
    index: int
    arrival_s: float
    """Seconds after the start of the replay at which the first turn is sent."""
    turns: list[Turn]

    @property
    def total_tokens(self) -> int:
        """The last turn's prompt plus its answer: the longest sequence the conversation needs."""
        return sum(len(t.user_ids) + t.output_tokens for t in self.turns)


@dataclass(frozen=True)
class ConversationWorkload:
    name: str
    """e.g. "multiturn@0.5/s"."""
    conversations: list[Conversation]
    seed: int
    rate: float
    """Poisson rate of conversation arrivals (conversations/s)."""
    scale: float

    def __post_init__(self) -> None:
        if not self.conversations:
            raise ValueError("workload: no conversations")

    @property
    def num_requests(self) -> int:
        """Turns over all conversations (each turn is one request)."""
        return sum(len(c.turns) for c in self.conversations)

    @property
    def duration_s(self) -> float:
        """Arrival time of the last conversation."""
        return self.conversations[-1].arrival_s

    def check_fits(self, max_model_len: int) -> None:
        """Raise ValueError when a conversation's last turn does not fit the model's context."""
        worst = max(self.conversations, key=lambda c: c.total_tokens)
        if worst.total_tokens > max_model_len:
            raise ValueError(
                f"workload: conversation {worst.index} grows to {worst.total_tokens} tokens "
                f"over {len(worst.turns)} turns, more than the model's context of "
                f"{max_model_len}; use a smaller --scale"
            )


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, int(rng.lognormvariate(math.log(median), sigma))))


def _scaled(n: int, scale: float) -> int:
    return max(1, int(round(n * scale)))


def multiturn(
    rate: float,
    num_conversations: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    vocab: int = 8000,
    id_range: tuple[int, int] = (3, 8000),
    salt: str = "",
) -> ConversationWorkload:
    """`num_conversations` conversations arriving as a Poisson process of `rate` per second
    (the first at t=0). `salt` changes the token ids alone (bench/workloads.py)."""
    if rate <= 0:
        raise ValueError(f"rate: must be > 0 conversations/s, got {rate}")
    if num_conversations < 1:
        raise ValueError(f"num_requests: need at least one conversation, got {num_conversations}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale: must be in (0, 1], got {scale}")
    low, high = id_range[0], min(vocab, id_range[1])
    if high <= low + 1:
        raise ValueError(f"vocab: {vocab} is too small for random prompts")
    lengths, arrivals = random.Random(f"{seed}-turns"), random.Random(f"{seed}-arr")
    ids = random.Random(f"{seed}-ids{salt}")
    t, convs = 0.0, []
    for i in range(num_conversations):
        turns = []
        for k in range(lengths.randint(MIN_TURNS, MAX_TURNS)):
            user = (
                _lognormal(lengths, 400, 0.6, 64, 2048)
                if k == 0
                else _lognormal(lengths, 120, 0.8, 8, 1024)
            )
            out = _lognormal(lengths, 180, 0.6, 16, 1024)
            user_ids = [ids.randrange(low, high) for _ in range(_scaled(user, scale))]
            turns.append(Turn(user_ids, _scaled(out, scale)))
        convs.append(Conversation(i, t, turns))
        t += arrivals.expovariate(rate)
    return ConversationWorkload(f"multiturn@{rate:g}/s", convs, seed, rate, scale)
