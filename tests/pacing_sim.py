"""The pacer against rate limiters, in virtual time: workers, concurrency slots, latency and
a limiter, as `Deliverer` and a platform have them, without sockets or sleeping.

Every request is one unit of work; a refused one waits its `Retry-After` (or a backoff) and
is sent again, as the deliverer does. Deterministic: the backoff's jitter comes from a
seeded generator.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from histimport.pace import Pacer
from histimport.sandbox.limits import FixedWindow, Limiter, TokenBucket


class NginxLimitReq:
    """nginx's `limit_req rate=R burst=B nodelay`: a leaky bucket of excess requests,
    refused with a bare 503 once the excess would pass the burst."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._excess = 0.0
        self._last: float | None = None

    def take(self, now: float) -> float | None:
        if self._last is None:
            self._last = now
            return None
        excess = max(0.0, self._excess - (now - self._last) * self._rate) + 1
        if excess > self._burst:
            return 0.0
        self._excess, self._last = excess, now
        return None


@dataclass
class Outcome:
    requests: int
    refused: int
    accepted: int
    window: float  # first request out to last answer in

    @property
    def refused_share(self) -> float:
        return self.refused / self.requests

    def sustained(self, limit: float, burst: float = 0.0) -> float:
        """Accepted requests per second over the send window, as a share of the limit,
        leaving out the burst the limiter grants at once."""
        return (self.accepted - burst) / self.window / limit


def simulate(
    limiter: Limiter,
    *,
    requests: int,
    latency: float = 0.020,
    concurrency: int = 8,
    workers: int = 32,
    retry_after: bool = True,
    pacer: Pacer | None = None,
    start: float = 1000.3,
    seed: int = 0,
) -> Outcome:
    pacer = pacer or Pacer()
    rng = random.Random(seed)
    events: list[tuple[float, int, Callable[[], None]]] = []
    order = itertools.count()
    clock = [start]
    free = [concurrency]
    waiting: list[Callable[[], None]] = []
    todo = [requests]
    counts = {"sent": 0, "refused": 0, "accepted": 0}
    last_answer = [start]

    def at(when: float, action: Callable[[], None]) -> None:
        heapq.heappush(events, (when, next(order), action))

    def worker() -> None:
        if todo[0] == 0:
            return
        todo[0] -= 1
        attempt(0)

    def attempt(tries: int) -> None:
        def slot() -> None:
            free[0] -= 1
            pace()

        def pace() -> None:
            cuts = pacer.cuts
            delay = pacer.delay(clock[0])
            if delay <= 0:
                send()
            else:
                at(clock[0] + delay, lambda: send() if pacer.cuts == cuts else pace())

        def send() -> None:
            sent_at = clock[0]
            counts["sent"] += 1
            wait = limiter.take(sent_at)
            at(sent_at + latency, lambda: answer(sent_at, wait))

        def answer(sent_at: float, wait: float | None) -> None:
            last_answer[0] = clock[0]
            free[0] += 1
            if waiting:
                waiting.pop(0)()
            if wait is None:
                counts["accepted"] += 1
                pacer.accepted(sent_at, clock[0])
                worker()
                return
            counts["refused"] += 1
            pacer.refused(sent_at, clock[0])
            if retry_after:
                pause = max(1, math.ceil(wait))
            else:
                pause = rng.uniform(0, min(30.0, 0.5 * 2**tries))
            at(clock[0] + pause, lambda: attempt(tries + 1))

        if free[0] > 0:
            slot()
        else:
            waiting.append(slot)

    for _ in range(workers):
        at(start, worker)
    while events:
        when, _, action = heapq.heappop(events)
        clock[0] = when
        action()
    return Outcome(counts["sent"], counts["refused"], counts["accepted"], last_answer[0] - start)


SHAPES: dict[str, Callable[[float], tuple[Limiter, bool, float]]] = {
    # name: limit -> (limiter, does it send Retry-After, burst granted at once)
    "bucket, burst 0.1 s, Retry-After": lambda r: (TokenBucket(r, r / 10), True, r / 10),
    "bucket, burst 0.1 s, bare 429": lambda r: (TokenBucket(r, r / 10), False, r / 10),
    "fixed 1 s window": lambda r: (FixedWindow(r), True, 0.0),
    "nginx limit_req burst=10 nodelay": lambda r: (NginxLimitReq(r, 10), False, 10.0),
    "bucket, burst 1 s (the sandbox's)": lambda r: (TokenBucket(r), True, r),
}


class Faulty:
    """A limiter behind a platform that also answers a share of all requests with a bare
    503, at random, whatever the rate: faults, not a limit."""

    def __init__(self, limiter: Limiter, share: float, seed: int = 3) -> None:
        self._limiter = limiter
        self._share = share
        self._random = random.Random(seed)

    def take(self, now: float) -> float | None:
        if self._random.random() < self._share:
            return 0.0
        return self._limiter.take(now)
