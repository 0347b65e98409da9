"""Incremental detokenization and stop-string handling for one sequence.

`Detokenizer` turns generated token ids into text one token at a time, decoding only a short window
of recent ids (the prefix/read offsets scheme of vLLM and TGI), and holds back a trailing partial
UTF-8 character ("\\ufffd" at the end of the decoded window) until a later token completes it.
`check_stop` finds a stop string that overlaps the newest text, and `stop_prefix_len` how much of
the newest text may still become one (streaming holds that much back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens kept in the first decode window (leading-space and merge context)."""


class Detokenizer:
    """Token ids in, stable text deltas out; O(1) decode work per token (amortized)."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_ids)  # prompt + output ids
        # ids[prefix_offset:read_offset] was already turned into text; it is decoded again only
        # as context, so that ids[read_offset:] decode to what they add after it.
        self._read_offset = len(self._ids)
        self._prefix_offset = max(len(self._ids) - PROMPT_CONTEXT_TOKENS, 0)
        self._prompt_len = len(self._ids)
        self._text = ""

    @property
    def text(self) -> str:
        """All stable output text so far (the concatenation of every returned delta)."""
        return self._text

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._prompt_len :]

    def add_token(self, token_id: int) -> str:
        """Append one generated token; return the text it made stable ("" while a char is partial)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the sequence: release held-back text even if it ends in a partial char."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""  # nothing new, or the last character is still incomplete: wait
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        return delta


def check_stop(
    text: str, new_delta_len: int, stop_strings: Sequence[str]
) -> tuple[str | None, int | None]:
    """Find the earliest stop string in `text` that overlaps its last `new_delta_len` characters.

    Only the tail that a new match can touch is searched (last new_delta_len + len(stop) - 1
    chars). Returns (matched stop string, index to truncate the text at, i.e. where the stop string
    starts), or (None, None).
    """
    if new_delta_len <= 0 or not stop_strings:
        return None, None
    best: tuple[str | None, int | None] = (None, None)
    for stop in stop_strings:
        start = max(len(text) - new_delta_len - len(stop) + 1, 0)
        at = text.find(stop, start)
        if at != -1 and (best[1] is None or at < best[1]):
            best = (stop, at)
    return best


def stop_prefix_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    held = 0
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held
