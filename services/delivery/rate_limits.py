"""Per-provider rate limits of one delivery process: a send waits on the injectable clock for its
channel's token bucket (`domain/rate_limit.py`) right before it is claimed. The limit is per
process: N delivery processes send up to N times the configured rate."""

from __future__ import annotations

from relevans.kit.clock import Clock
from services.delivery.domain.rate_limit import TokenBucket


class RateLimiter:
    """Messages per second through one channel, shared by every lane (connection) of a process."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self.bucket = TokenBucket(rate)
        self.clock = clock

    async def acquire(self) -> None:
        """Return once the next send may go."""
        wait = self.bucket.reserve(self.clock.now())
        if wait > 0:
            await self.clock.sleep(wait)
