"""Per-provider rate limits: a token bucket on the injectable clock. Pure arithmetic; the worker
waits on the clock for the time `reserve` says.

The bucket holds at most `burst` tokens (1 by default) and gains `rate` per second; each send
takes one. A send that finds none reserves the next token anyway and waits until it is due, so
waiting senders go in the order they asked and never wait longer than needed. With a burst of 1,
sends are spaced at least 1/rate apart: no clock second sees more than `rate` of them.
"""

from __future__ import annotations

from datetime import datetime


class TokenBucket:
    def __init__(self, rate: float, burst: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (no bucket means no limit)")
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._at: datetime | None = None

    def reserve(self, now: datetime) -> float:
        """Take a token; return how many seconds from `now` the send must wait for it (0: none)."""
        if self._at is not None:
            elapsed = max(0.0, (now - self._at).total_seconds())
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._at = now if self._at is None else max(self._at, now)
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
