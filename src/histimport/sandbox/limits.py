"""Rate limiters of the shapes real platforms put in front of an endpoint.

Each takes the time from its caller and answers a request with None (let through) or the
seconds until one would pass: the sandbox sends that, rounded up, as `Retry-After`.

- `TokenBucket`: `rate` tokens a second, at most `burst` stored (the sandbox's default burst
  is one second's worth; many gateways allow a tenth of that or less);
- `FixedWindow`: at most `rate` requests in each whole second of the clock, as counters in
  Redis or a CDN keep them: a client over the limit is refused until the next second.
"""

from __future__ import annotations

import math
import threading
from enum import StrEnum
from typing import Protocol


class LimiterShape(StrEnum):
    BUCKET = "bucket"
    FIXED = "fixed"


class Limiter(Protocol):
    def take(self, now: float) -> float | None: ...


class TokenBucket:
    """At most `rate` requests a second on average, with bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self._rate = rate
        self._capacity = max(1.0, rate if burst is None else burst)
        self._tokens = self._capacity
        self._updated: float | None = None
        self._lock = threading.Lock()

    def take(self, now: float) -> float | None:
        with self._lock:
            if self._updated is not None:
                elapsed = max(0.0, now - self._updated)
                self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            return (1.0 - self._tokens) / self._rate


class FixedWindow:
    """At most `rate` requests in each second of the clock (rounded down to whole requests,
    at least one)."""

    def __init__(self, rate: float) -> None:
        self._allowed = max(1, int(rate))
        self._window = -1
        self._count = 0
        self._lock = threading.Lock()

    def take(self, now: float) -> float | None:
        with self._lock:
            window = math.floor(now)
            if window != self._window:
                self._window, self._count = window, 0
            if self._count < self._allowed:
                self._count += 1
                return None
            return window + 1 - now


def make_limiter(shape: LimiterShape, rate: float, burst: float | None = None) -> Limiter:
    if shape is LimiterShape.FIXED:
        return FixedWindow(rate)
    return TokenBucket(rate, burst)


def retry_after_header(wait: float) -> str:
    """Whole seconds, at least one, as HTTP wants them."""
    return str(max(1, math.ceil(wait)))
