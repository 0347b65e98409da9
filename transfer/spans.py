"""`SpanLog`: time spans of one activity (a link transmitting, a sender waiting), and the
fraction of a recent window they cover. Thread-safe; keeps only `history_s` of spans."""

from __future__ import annotations

import threading
import time
from collections import deque


class SpanLog:
    def __init__(self, history_s: float = 60.0) -> None:
        if history_s <= 0:
            raise ValueError(f"history_s must be positive, got {history_s}")
        self.history_s = history_s
        self._lock = threading.Lock()
        self._spans: deque[tuple[float, float]] = deque()  # (start, end) on time.monotonic()

    def add(self, start: float, end: float) -> None:
        """Record [start, end) (time.monotonic(); nothing when empty) and forget the spans that
        ended before the history reaches back."""
        now = time.monotonic()
        with self._lock:
            if end > start:
                self._spans.append((start, end))
            while self._spans and self._spans[0][1] < now - self.history_s:
                self._spans.popleft()

    def fraction(self, window_s: float) -> float:
        """Share of the last window_s seconds the spans cover (0 for an empty window)."""
        if window_s <= 0:
            return 0.0
        now = time.monotonic()
        lo = now - window_s
        with self._lock:
            covered = sum(max(0.0, min(e, now) - max(s, lo)) for s, e in self._spans)
        return min(1.0, covered / window_s)
