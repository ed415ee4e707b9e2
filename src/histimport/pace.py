"""Pacing: the request rate the platform accepts, found from its answers.

Until the platform first pushes back (a 429, a 503), requests leave as fast as the
concurrency allows, or at `--rate`. From then on they leave evenly spaced, at a rate that
follows what the platform *accepted*:

- **estimate**: at a push-back, the platform's limit is taken as the rate the tool offered
  times the share of the last second's answers that were not pushed back, or what was
  taken over that second if more, and never far above the most ever taken in a second. The
  offered rate is the pace (before there is one, the requests sent over the last second),
  so a second in which the workers sat idle, waiting out a `Retry-After`, does not pass for
  a low limit;
- **back off gently**: the rate drops to 0.9 of the smaller of the pace and the estimate. A
  refusal of a request that left before the last cut says nothing new (it was sent at the
  old rate) and is ignored; when requests sent within a round trip after two cuts in a row
  are refused as well, the cut was not enough and the rate halves, so that a limiter that
  refuses everything for a while (a fixed window, an overload) is not flooded;
- **grow back fast, then probe**: between refusals the rate closes half of its gap to the
  estimate every `_REGAIN` seconds, and once there it probes upward by `_PROBE` of the
  estimate per second, twice as fast for every `_PROBE_SPEEDUP` seconds without a cut, so
  that a limit that rises is found too. It grows only while the pace held requests back;
- **an outage is not a limit**: push-backs with nothing accepted in the last second, or
  nothing accepted since the last cut once the pace is far below the estimate, cut the rate
  but leave the estimate as it was, so that the run regains its pace within seconds once
  the platform is back;
- **a slow limit**: at a request a second or so, a second holds too few answers to tell a
  share from, so the estimate reads the last `_FEWEST` answers however long they took;
- **faults are not a limit either**: a platform may refuse a share of requests whatever the
  rate (a 503 now and then from a busy node). Its noise is the median share refused over
  the last seconds paced below both the estimate and the pace last refused, where a limiter
  refuses nothing. A push-back while the last second's refused share is within the noise
  (and two standard deviations) cuts nothing, and the estimate discounts the noise: else
  random faults would drive the rate down to nothing.

This is AIMD on the rate (as TCP and Vector's adaptive request concurrency do it on a
window), with a measured estimate in place of a fixed additive step. `--rate` caps it
throughout. Every method takes the time from the caller: the class is pure, and its tests
and simulations run in virtual time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

_WINDOW = 1.0
"""Seconds of answers the estimate counts: limiters count per second, or finer."""
_FEWEST = 10
"""Answers the estimate counts at least, over as many seconds as they take: at a limit of
a request a second or so, one second holds too few to tell a share from."""
_CUT = 0.9
"""The rate after a push-back, as a share of the estimate."""
_REGAIN = 0.35
"""Seconds in which the rate closes half of its gap to the estimate."""
_PROBE = 0.02
"""Upward probing beyond the estimate: this share of it per second, at first."""
_PROBE_SPEEDUP = 3.0
"""Seconds without push-back after which the probing is twice as fast (and so on)."""
_MAX_DOUBLINGS = 5
"""The probing speeds up to 2**5 = 32 times `_PROBE` per second, no further."""
_BEST_MARGIN = 1.2
"""How far above the most ever taken in a second an estimate may be."""
_QUIET = 0.95
"""Paced below this share of the estimate, a refusal is the platform's noise."""
_QUIET_SECONDS = 10
"""Seconds paced below the estimate that the noise is measured over."""
_MAX_NOISE = 0.25
"""A larger share refused whatever the pace is not noise."""
MIN_RATE = 0.5
"""Requests per second the rate never goes below: a run always moves."""


@dataclass(frozen=True, slots=True)
class PaceState:
    """What the pacer shows: for the progress display, the logs and the report."""

    rate: float | None
    """Requests per second it paces at; None while unpaced."""
    limit: float | None
    """The rate the platform accepts, as last estimated at a push-back."""


class Pacer:
    """Spaces requests at the rate the platform accepts. See the module's docstring."""

    def __init__(self, ceiling: float | None = None) -> None:
        self.ceiling = ceiling
        self.rate: float | None = ceiling
        self.limit: float | None = None
        self.peak: float | None = None  # the highest rate paced at, for the report
        self.cuts = 0  # how often the rate was cut: a wait that spans a cut is asked again
        self._next = -math.inf  # the next free slot
        self._answers: deque[tuple[float, bool]] = deque()  # the last second's: (when, taken)
        self._taken = 0  # of those, not pushed back
        self._recent: deque[tuple[float, bool]] = deque(maxlen=_FEWEST)  # the last answers
        self._best = 0.0  # the most taken a second over such a window, once a second passed
        self._sent: deque[float] = deque()  # when the last second's requests left
        self._started: float | None = None  # when the first request left
        self._cut_at = -math.inf
        self._cut_from = math.inf  # the pace the last cut came at
        self._strikes = 0  # cuts in a row, each within a round trip of the one before
        self._since_cut = [0, 0]  # answers to requests sent since the last cut: taken, refused
        self._grown_at = 0.0
        self._held_at = -math.inf  # when a request last waited for its slot
        # Seconds paced below the estimate: [second, answers, refused].
        self._quiet: deque[list[int]] = deque(maxlen=_QUIET_SECONDS)

    @property
    def state(self) -> PaceState:
        return PaceState(self.rate, self.limit)

    def delay(self, now: float) -> float:
        """Seconds until the next request may leave; its slot is taken. If the rate is cut
        (`cuts` changes) during the wait, the slot is void: ask again."""
        if self._started is None:
            self._started = now
        self._sent.append(now)
        if self.rate is None:
            return 0.0
        at = max(now, self._next)
        self._next = at + 1.0 / self.rate
        if at > now:
            self._held_at = now
        return at - now

    def accepted(self, sent_at: float, now: float) -> None:
        """An answer that the platform did not push back on (whatever it said of the
        messages) to a request that left at `sent_at`."""
        self._answer(sent_at, now, taken=True)
        self._grow(now)

    def refused(self, sent_at: float, now: float) -> None:
        """A push-back (429, 503) to a request that left at `sent_at`."""
        self._answer(sent_at, now, taken=False)
        if sent_at < self._cut_at:
            return  # it left at the rate already cut: no news
        answers = len(self._answers)
        noise = self.noise(now)
        if noise and 1 - self._taken / answers <= noise + 2 * math.sqrt(noise / answers):
            return  # no more refused than the platform refuses anyway: no news either
        span = max(min(_WINDOW, now - (self._started or sent_at)), 0.01)
        offered = self.rate if self.rate is not None else len(self._sent) / span
        if not offered:
            return  # no request went through the pace: nothing to measure a cut from
        repeated = sent_at - self._cut_at <= max(now - sent_at, 0.05)
        self._strikes = self._strikes + 1 if repeated else 0
        # Far below the estimate, with nothing taken since the last cut, the platform is
        # failing (an outage setting in): what it took a second ago still stands.
        failing = (
            self.limit is not None
            and self.rate is not None
            and self.rate < 0.5 * self.limit
            and self._since_cut[1] >= 1
            and not self._since_cut[0]
        )
        limit = self.limit if failing and self.limit is not None else None
        if limit is None:
            limit = self._estimate(now, span, offered, noise)
        if self._best:
            # Never far above what was ever taken in a whole second: early estimates, from
            # less than a second of answers, can be far too high (and at a limit of a request
            # a second or so, no second has two answers taken to estimate from).
            limit = min(limit, _BEST_MARGIN * self._best)
        self.limit = limit
        cut = 0.5 if self._strikes >= 2 else _CUT
        self._cut_from = offered
        self.rate = max(MIN_RATE, min(offered, limit) * cut)
        if self.ceiling is not None:
            self.rate = min(self.rate, self.ceiling)
        self._cut_at = now
        self._grown_at = now
        self._since_cut = [0, 0]
        self.cuts += 1
        # The new spacing applies from now on: the slots booked at the old rate are void.
        self._next = now + 1.0 / self.rate

    def _estimate(self, now: float, span: float, offered: float, noise: float) -> float:
        """The rate the platform accepts, from its last answers."""
        window, taken_in_it = self._answers, self._taken
        # Nothing taken among the last second's answers, of which there are a few, or among
        # the last answers at all: an outage, which says nothing of the limit.
        outage = not self._taken and (len(window) >= 3 or not any(t for _, t in self._recent))
        if len(window) < _FEWEST:  # a slow pace: the last answers, however long they took
            window, taken_in_it = self._recent, sum(taken for _, taken in self._recent)
            span = max(span, now - window[0][0])
        if outage or not taken_in_it:
            return self.limit if self.limit is not None else offered
        # Whichever is higher: the share taken of what was offered (right when the workers
        # idled), or what was taken over the window (right when a limiter refuses everything
        # until its window ends, as a fixed window does).
        taken = min(1.0, taken_in_it / len(window) / (1 - noise))
        return max(offered * taken, taken_in_it / span)

    def noise(self, now: float) -> float:
        """The share of requests the platform refuses whatever the pace."""
        second = math.floor(now)
        shares = sorted(r / a for s, a, r in self._quiet if a >= 5 and second - 60 < s < second)
        noise = shares[len(shares) // 2] if len(shares) >= 5 else 0.0
        # More than that is not noise: an outage, or a limiter still refusing everything
        # (a fixed window before it ends) while the pace was cut.
        return noise if noise <= _MAX_NOISE else 0.0

    def _answer(self, sent_at: float, now: float, *, taken: bool) -> None:
        if sent_at >= self._cut_at:
            self._since_cut[0 if taken else 1] += 1
        quiet = self.rate is not None and self.rate < _QUIET * min(self.limit or 0, self._cut_from)
        # Not while cuts come in a row: a limiter refusing everything for a while (a fixed
        # window before it ends) says nothing of the platform's noise.
        if quiet and sent_at > self._cut_at and not self._strikes:
            second = math.floor(now)
            if not self._quiet or self._quiet[-1][0] != second:
                self._quiet.append([second, 0, 0])
            self._quiet[-1][1] += 1
            self._quiet[-1][2] += not taken
        self._answers.append((now, taken))
        self._recent.append((now, taken))
        self._taken += taken
        while self._answers[0][0] <= now - _WINDOW:
            self._taken -= self._answers.popleft()[1]
        if self._started is not None and now - self._started >= _WINDOW:
            seconds = max(_WINDOW, now - self._recent[0][0])
            recent = sum(taken for _, taken in self._recent)
            self._best = max(self._best, self._taken / _WINDOW, recent / seconds)
        while self._sent and self._sent[0] <= now - _WINDOW:
            self._sent.popleft()

    def _grow(self, now: float) -> None:
        elapsed = now - self._grown_at
        self._grown_at = now
        if self.rate is None or self.limit is None or elapsed <= 0:
            return
        if now - self._held_at > _WINDOW:
            return  # the rate held nothing back: raising it would test nothing
        regain = (self.limit - self.rate) * (1.0 - 0.5 ** (elapsed / _REGAIN))
        calm = now - self._cut_at
        probe = self.limit * _PROBE * elapsed * 2.0 ** min(calm / _PROBE_SPEEDUP, _MAX_DOUBLINGS)
        self.rate += max(regain, probe)
        if self.ceiling is not None:
            self.rate = min(self.rate, self.ceiling)
        self.peak = max(self.peak or 0.0, self.rate)
