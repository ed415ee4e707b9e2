"""The pacer: its decisions one by one, then against rate limiters of several shapes in
virtual time (tests/pacing_sim.py): no sockets, no sleeping, no wall-clock assertion."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from histimport.pace import Pacer
from histimport.sandbox.limits import TokenBucket

from .pacing_sim import SHAPES, Faulty, NginxLimitReq, simulate


def paced_moments(pacer: Pacer, n: int, start: float = 50.0) -> list[float]:
    """When n requests leave, each asking as soon as the one before has left."""
    now, moments = start, []
    for _ in range(n):
        now += pacer.delay(now)
        moments.append(now)
    return moments


def test_unpaced_until_the_platform_pushes_back() -> None:
    pacer = Pacer()
    assert paced_moments(pacer, 100) == [50.0] * 100
    assert pacer.state.rate is None


def test_rate_spaces_requests_evenly_without_a_burst() -> None:
    """--rate R: one request every 1/R seconds from the first on."""
    moments = paced_moments(Pacer(ceiling=4.0), 9)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(moments)}
    assert moments[0] == 50.0 and gaps == {0.25}


def test_a_push_back_paces_at_a_share_of_what_was_accepted() -> None:
    pacer = Pacer()
    now = 10.0
    for i in range(200):  # one second at 200 requests/s, all accepted
        pacer.delay(now + i / 200)
        pacer.accepted(now + i / 200, now + i / 200 + 0.02)
    pacer.refused(sent_at=11.0, now=11.02)
    assert pacer.limit == pytest.approx(200, rel=0.05)
    assert pacer.rate == pytest.approx(0.9 * 200, rel=0.05)


def test_a_refusal_of_a_request_sent_before_the_cut_is_no_news() -> None:
    pacer = Pacer(ceiling=100.0)
    for i in range(100):
        pacer.delay(10 + i / 100)
        pacer.accepted(10 + i / 100, 10 + i / 100 + 0.02)
    pacer.refused(sent_at=11.00, now=11.02)
    after_one = pacer.rate
    pacer.refused(sent_at=11.01, now=11.03)  # left before the cut at 11.02
    assert pacer.rate == after_one and pacer.cuts == 1


def test_refusals_that_go_on_after_two_cuts_halve_the_rate() -> None:
    """A limiter that refuses everything for a while (a fixed window, an overload)."""
    pacer = Pacer(ceiling=100.0)
    for i in range(100):
        pacer.delay(10 + i / 100)
        pacer.accepted(10 + i / 100, 10 + i / 100 + 0.02)
    rates = []
    sent = 11.0
    for _ in range(4):
        pacer.refused(sent_at=sent, now=sent + 0.02)
        rates.append(pacer.rate)
        sent += 0.03  # the next one left just after that cut, and is refused too
    assert rates[1] == pytest.approx(0.9 * rates[0], rel=0.01)
    assert rates[3] == pytest.approx(0.5 * rates[2], rel=0.01)


def test_a_lost_half_is_regained_within_a_few_seconds() -> None:
    pacer = Pacer()
    now = 10.0
    for i in range(100):
        pacer.delay(now + i / 100)
        pacer.accepted(now + i / 100, now + i / 100 + 0.02)
    pacer.refused(sent_at=11.0, now=11.02)
    limit = pacer.limit
    assert limit is not None
    pacer.rate = limit / 2  # as after a run of push-backs
    now = 11.02
    while now < 13.0:  # two seconds of requests held back by the pace, all accepted
        now += pacer.delay(now)
        pacer.accepted(now, now + 0.02)
    assert pacer.rate >= 0.9 * limit


def test_after_an_outage_the_pace_is_regained_within_seconds() -> None:
    """100 requests/s, then three seconds of nothing but 503s: the rate falls to almost
    nothing meanwhile, and the estimate stands, so the pace is back within three seconds of
    the platform's return (the refused requests' own backoffs included)."""

    class Outage:
        def __init__(self) -> None:
            self.bucket = TokenBucket(100.0, 10)

        def take(self, now: float) -> float | None:
            return 0.0 if 1005.0 <= now < 1008.0 else self.bucket.take(now)

    taken: Counter[int] = Counter()

    class Counting(Pacer):
        def accepted(self, sent_at: float, now: float) -> None:
            taken[int(now - 1000)] += 1
            super().accepted(sent_at, now)

    simulate(Outage(), requests=2500, retry_after=False, pacer=Counting(), start=1000.0)
    assert taken[5] + taken[6] + taken[7] < 10  # the outage
    assert all(taken[second] >= 90 for second in range(11, 20)), sorted(taken.items())


def test_the_rate_never_exceeds_the_ceiling() -> None:
    pacer = Pacer(ceiling=50.0)
    now = 0.0
    for _ in range(2000):
        now += pacer.delay(now)
        pacer.accepted(now, now + 0.01)
    assert pacer.rate == 50.0


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_limit_sets_the_pace_whatever_its_shape(shape: str) -> None:
    """100 requests/s, 20 ms latency, 8 in flight, 2,000 requests: at least 90% of the limit
    over the send window, at most 5% of the requests refused."""
    limiter, retry_after, burst = SHAPES[shape](100.0)
    outcome = simulate(limiter, requests=2000, retry_after=retry_after)
    assert outcome.accepted == 2000
    assert outcome.sustained(100.0, burst) >= 0.9, outcome
    assert outcome.refused_share <= 0.05, outcome


def test_a_limit_that_rises_is_found() -> None:
    """The platform raises its limit from 50 to 150 requests/s mid-run."""

    class Rising:
        def __init__(self) -> None:
            self.low = NginxLimitReq(50.0, 5)
            self.high = NginxLimitReq(150.0, 5)

        def take(self, now: float) -> float | None:
            return (self.low if now < 1010.0 else self.high).take(now)

    pacer = Pacer()
    simulate(Rising(), requests=3000, pacer=pacer)
    assert pacer.peak is not None and pacer.peak > 120


@pytest.mark.parametrize(("share", "floor"), [(0.02, 0.9), (0.08, 0.3)])
def test_random_faults_are_not_taken_for_a_limit(share: float, floor: float) -> None:
    """A platform that answers a share of all requests with a bare 503, whatever the rate,
    behind a limit of 150 requests/s: the faults do not drive the pace down to nothing."""
    outcome = simulate(Faulty(TokenBucket(150.0), share), requests=3000, retry_after=False)
    assert outcome.accepted == 3000
    assert outcome.sustained(150.0) >= floor, outcome


def test_hours_without_a_push_back_do_not_overflow_the_probing() -> None:
    pacer = Pacer()
    for i in range(100):
        pacer.delay(10 + i / 100)
        pacer.accepted(10 + i / 100, 10 + i / 100 + 0.02)
    pacer.refused(sent_at=11.0, now=11.02)
    limit = pacer.limit
    assert limit is not None
    rates = []
    for second in range(12, 3 * 3600):  # three hours, the pace holding requests back
        pacer.delay(second)
        pacer.delay(second)
        pacer.accepted(second, second + 0.01)
        rates.append(pacer.rate)
    assert all(math.isfinite(rate or 0) for rate in rates)
    # At most 2**5 times the first probing speed, 2% of the estimate a second.
    steps = [b - a for a, b in itertools.pairwise(rates[-100:]) if a and b]
    assert max(steps) <= 32 * 0.02 * limit * 1.01


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_limit_of_one_request_a_second_is_found_too(shape: str) -> None:
    """No second has two answers taken: the estimate still comes down from the first,
    unpaced burst's."""
    limiter, retry_after, _ = SHAPES[shape](1.0)
    pacer = Pacer()
    outcome = simulate(limiter, requests=60, retry_after=retry_after, pacer=pacer)
    assert outcome.accepted == 60
    assert pacer.limit is not None and pacer.limit < 3, pacer.state
    # Most refusals come in the first second, sent before the platform first pushed back.
    assert outcome.requests <= 2 * outcome.accepted, outcome


def test_a_rate_ceiling_below_the_least_pace_holds() -> None:
    pacer = Pacer(ceiling=0.2)
    pacer.delay(10.0)
    pacer.refused(sent_at=10.0, now=10.1)
    assert pacer.rate == 0.2
    assert pacer.delay(10.2) == pytest.approx(5.0 - 0.1, abs=0.2)
