"""A token bucket, for what a sandbox may make the server do or keep at some rate."""

from __future__ import annotations

import time


class TokenBucket:
    """`burst` tokens, refilled at `rate` a second; `take(n)` is False (and counts a drop) without them."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = burst, rate
        self.tokens, self.at = float(burst), time.monotonic()
        self.dropped, self.warned = 0, 0.0
        """Takes refused so far; when the owner last said so (its own bookkeeping)."""

    def available(self) -> int:
        """Whole tokens there are now (after the refill since the last look)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return int(self.tokens)

    def take(self, n: int = 1) -> bool:
        if self.available() >= n:
            self.tokens -= n
            return True
        self.dropped += 1
        return False
