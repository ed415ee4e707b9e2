"""Delivery decisions with httpx.MockTransport: order, splitting, aborting, pacing."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from histimport.config import Config
from histimport.deliver import Deliverer, DeliveryStats
from histimport.ledger import Ledger

from .factory import Waiting, deliver_waiting, interleaved, stage

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


WAITING: dict[int, Waiting] = {}
"""By id of its ledger, what a test recorded to send."""


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[Callable[[list[dict[str, Any]]], Ledger]]:
    """A ledger with the given rows recorded, closed after the test."""
    ledgers: list[Ledger] = []

    def staged_ledger(rows: list[dict[str, Any]]) -> Ledger:
        state_dir = tmp_path / f"state-{len(ledgers)}"
        ledger = Ledger(state_dir)
        ledgers.append(ledger)
        ledger.begin_run("load", "mock")
        WAITING[id(ledger)] = stage(ledger, state_dir, rows)
        return ledger

    yield staged_ledger
    for ledger in ledgers:
        WAITING.pop(id(ledger), None)
        ledger.close()


def accept_all(request: httpx.Request) -> httpx.Response:
    uuids = [m["sourceUuid"] for m in orjson.loads(request.content)["saveMessageRequestList"]]
    return httpx.Response(
        200, json={"succesfullySubmittedSourceUuids": uuids, "failedSourceUuids": []}
    )


def deliver(ledger: Ledger, handler: Handler, **options: Any) -> DeliveryStats:
    config = Config(base_url="http://mock/communications", **options)
    deliverer = Deliverer(
        config=config,
        ledger=ledger,
        base_url=config.base_url or "",
        credentials=("u", "p"),
        transport=httpx.MockTransport(handler),
    )
    stats = deliver_waiting(deliverer, WAITING[id(ledger)])
    ledger.settle()
    return stats


def customer_of(request: httpx.Request) -> str:
    return request.url.path.split("/")[5]


def test_order_kept_and_one_request_in_flight_per_customer(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=12, per_customer=25)))
    in_flight: dict[str, int] = defaultdict(int)
    peak_per_customer = 0
    peak_total = 0
    seen: dict[str, list[str]] = defaultdict(list)

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal peak_per_customer, peak_total
        customer = customer_of(request)
        in_flight[customer] += 1
        peak_per_customer = max(peak_per_customer, in_flight[customer])
        peak_total = max(peak_total, sum(in_flight.values()))
        await asyncio.sleep(0.002)
        in_flight[customer] -= 1
        seen[customer] += [
            m["sourceUuid"] for m in orjson.loads(request.content)["saveMessageRequestList"]
        ]
        return accept_all(request)

    stats = deliver(ledger, handler, chunk_size=10, concurrency=4)
    assert peak_per_customer == 1
    assert 1 < peak_total <= 4
    assert all(uuids == sorted(uuids) and len(uuids) == 25 for uuids in seen.values())
    assert stats.requests == 12 * 3
    assert ledger.counts()["accepted"] == 300


def test_request_body_shape_and_auth(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=3)))
    requests: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return accept_all(request)

    deliver(ledger, handler, callback_url="https://cb.example/x")
    (request,) = requests
    assert request.method == "PUT"
    assert (
        request.url.path
        == "/communications/department/dep-0/customer/cust-00000/communication/historical"
    )
    assert request.headers["authorization"].startswith("Basic ")
    assert request.headers["content-type"] == "application/json"
    body = orjson.loads(request.content)
    assert body["callBackPathUrl"] == "https://cb.example/x"
    assert [m["sourceUuid"] for m in body["saveMessageRequestList"]] == [
        "dep-0.cust-00000.000000",
        "dep-0.cust-00000.000001",
        "dep-0.cust-00000.000002",
    ]


def test_413_splits_in_order_and_lowers_the_limit(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=40)))
    order: list[str] = []
    refused_from: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if len(request.content) > 3000:
            first = orjson.loads(request.content)["saveMessageRequestList"][0]["sourceUuid"]
            refused_from.append(first)
            return httpx.Response(413, text="<html>413 Request Entity Too Large</html>")
        order.extend(
            m["sourceUuid"] for m in orjson.loads(request.content)["saveMessageRequestList"]
        )
        return accept_all(request)

    stats = deliver(ledger, handler, chunk_size=20)
    assert order == sorted(order) and len(order) == 40
    assert stats.splits >= 1
    assert ledger.counts()["accepted"] == 40
    # Only the first chunk meets 413s: the limit it taught cuts the second one before sending.
    assert refused_from and all(uuid < order[20] for uuid in refused_from)


def test_a_single_message_too_large_fails_with_its_own_reason(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=2)))

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(413)

    deliver(ledger, handler)
    failures = list(ledger.failures())
    assert len(failures) == 2
    assert {f.errors[0]["errorCode"] for f in failures} <= {
        "REQUEST_TOO_LARGE",
        "MESSAGE_TOO_LARGE",
    }
    assert {f.http_status for f in failures} == {413}
    assert not any(f.retryable for f in failures)


def test_401_aborts_with_few_requests_and_nothing_accepted(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=50, per_customer=4)))
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.001)
        return httpx.Response(401, json={"errors": [{"errorCode": "UNAUTHORIZED"}]})

    stats = deliver(ledger, handler, concurrency=4)
    assert stats.aborted is not None
    assert calls <= 4 + 1
    assert ledger.counts()["notSent"] == 200


def test_after_a_401_no_request_leaves_not_even_one_waiting_for_its_turn(staged: Any) -> None:
    """503s make the run pace its requests, so that workers wait for a turn; the 401 that
    comes then stops them all where they wait."""
    ledger = staged(list(interleaved(customers=40, per_customer=2)))
    calls = 0
    after_401 = 0
    refused = False

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls, after_401, refused
        calls += 1
        after_401 += refused
        if calls <= 8:
            return httpx.Response(503)
        await asyncio.sleep(0.02)
        refused = True
        return httpx.Response(401)

    stats = deliver(ledger, handler, concurrency=8)
    assert stats.aborted is not None and stats.pace.rate is not None
    assert calls > 8 and after_401 == 0, (calls, after_401)
    assert ledger.counts()["notSent"] == 80


def test_a_401_while_a_chunk_is_split_leaves_its_other_half_simply_not_sent(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=4)))

    async def handler(request: httpx.Request) -> httpx.Response:
        messages = orjson.loads(request.content)["saveMessageRequestList"]
        return httpx.Response(413 if len(messages) > 2 else 401)

    stats = deliver(ledger, handler)
    assert stats.aborted is not None and stats.splits == 1
    failures = list(ledger.failures())
    assert len(failures) == 4 and {f.stage for f in failures} == {"notSent"}
    assert not any(f.errors for f in failures)  # no HELD_BACK: nothing more was sent at all


@pytest.mark.parametrize("status", [401, 403, 404, 413])
def test_an_oversized_error_answer_is_told_by_its_status(staged: Any, status: int) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=1)))

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=b"<html>" + b"x" * 200_000 + b"</html>")

    stats = deliver(ledger, handler, max_response_bytes=64 * 1024)
    assert stats.requests == 1 and stats.statuses[str(status)] == 1
    if status in (401, 403):
        assert stats.aborted is not None and ledger.counts()["notSent"] == 1
    else:
        (failure,) = ledger.failures()
        assert failure.http_status == status and not failure.retryable


@pytest.mark.parametrize("status", [202, 204])
def test_a_success_without_a_body_confirms_nothing_and_is_not_sent_again(
    staged: Any, status: int
) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=3)))

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status)

    stats = deliver(ledger, handler)
    assert stats.requests == 1
    failures = list(ledger.failures())
    assert [f.errors[0]["errorCode"] for f in failures] == ["UNCONFIRMED"] * 3
    assert all(f.retryable and f.http_status == status for f in failures)


def test_503_with_one_attempt_fails_retryable_with_its_status(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=3)))

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="down")

    stats = deliver(ledger, handler, max_attempts=1)
    failures = list(ledger.failures())
    assert {(f.stage, f.retryable, f.http_status) for f in failures} == {("failed", True, 503)}
    assert stats.retries == 0


def test_retries_until_success_and_counts_unknown_outcomes(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=3)))
    answers = iter([httpx.Response(500), httpx.Response(200, text="<html>"), None])

    async def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        return answer if answer is not None else accept_all(request)

    stats = deliver(ledger, handler, max_attempts=3)
    assert (stats.retries, stats.unknown_outcomes, stats.requests) == (2, 2, 3)
    assert ledger.counts()["accepted"] == 3


def test_a_timeout_is_retried(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=1)))
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ReadTimeout("no answer", request=request)
        return accept_all(request)

    stats = deliver(ledger, handler)
    assert (stats.retries, ledger.counts()["accepted"]) == (1, 1)


def test_a_429_pauses_and_is_not_given_up_on(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=3, per_customer=1)))
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 8:
            return httpx.Response(429, headers={"Retry-After": "0"})
        return accept_all(request)

    stats = deliver(ledger, handler, max_attempts=2)
    assert ledger.counts()["accepted"] == 3
    assert stats.statuses["429"] == 8
    assert stats.push_backs == {"429 Retry-After: 0": 8}
    assert stats.pace.rate is not None  # paced from the first push-back on


def test_a_redirect_is_not_followed(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=1)))
    hosts: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(307, headers={"Location": "http://evil.example/steal"})

    deliver(ledger, handler)
    assert hosts == ["mock"]
    (failure,) = ledger.failures()
    assert "evil.example" in failure.errors[0]["errorDescription"]


@pytest.mark.parametrize("unordered", [False, True])
def test_every_message_gets_an_outcome(staged: Any, unordered: bool) -> None:
    ledger = staged(list(interleaved(customers=7, per_customer=9)))

    async def handler(request: httpx.Request) -> httpx.Response:
        return accept_all(request)

    deliver(ledger, handler, chunk_size=4, unordered=unordered)
    assert ledger.counts() == {
        "rejected": 0,
        "accepted": 63,
        "failed": 0,
        "notSent": 0,
        "alreadyAccepted": 0,
    }


def test_an_oversized_answer_is_cut_off_not_read_whole(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=1)))

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"[" + b"0," * 600_000 + b"0]")

    stats = deliver(ledger, handler, max_response_bytes=64 * 1024, max_attempts=2)
    (failure,) = ledger.failures()
    assert failure.errors[0]["errorCode"] == "RESPONSE_TOO_LARGE" and failure.retryable
    assert stats.requests == 2


def test_a_429_without_retry_after_does_not_use_up_the_attempts(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=1, per_customer=2)))
    answers = [httpx.Response(429, text="<html>slow down</html>")] * 5

    async def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop() if answers else accept_all(request)

    stats = deliver(ledger, handler, max_attempts=2)
    assert ledger.counts()["accepted"] == 2
    assert stats.statuses["429"] == 5


def test_after_a_retryable_failure_the_customer_is_held_back(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=2, per_customer=30)))
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        customer = customer_of(request)
        seen.append(customer)
        if customer == "cust-00000":
            return httpx.Response(503)
        return accept_all(request)

    deliver(ledger, handler, chunk_size=10, max_attempts=1)
    assert seen.count("cust-00000") == 1 and seen.count("cust-00001") == 3
    failures = list(ledger.failures())
    assert [f.stage for f in failures] == ["failed"] * 10 + ["notSent"] * 20
    assert {f.errors[0]["errorCode"] for f in failures[10:]} == {"HELD_BACK"}
    assert all(f.retryable for f in failures)


def test_status_tells_the_messages_in_flight(staged: Any, tmp_path: Path) -> None:
    from histimport.status import status

    ledger = staged(interleaved(customers=3, per_customer=5))
    seen: list[dict[str, int]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(status(tmp_path / "state-0")["lastRun"])
        return accept_all(request)

    deliver(ledger, handler, concurrency=1, chunk_size=2)
    # One request at a time, of two messages or a customer's last one; the messages of
    # the requests answered before it are accepted.
    assert [s.get("inFlight") for s in seen] == [2, 2, 1] * 3
    assert [s.get("accepted", 0) for s in seen] == [0, 2, 4, 5, 7, 9, 10, 12, 14]
    assert all(s.get("pending", 0) + s["inFlight"] + s.get("accepted", 0) == 15 for s in seen)
    assert "inFlight" not in status(tmp_path / "state-0")["lastRun"]


def test_cookies_set_by_the_server_are_not_sent_back(staged: Any) -> None:
    ledger = staged(interleaved(customers=2, per_customer=4))
    cookies: list[str | None] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        cookies.append(request.headers.get("cookie"))
        answer = accept_all(request)
        answer.headers["set-cookie"] = "AWSALB=sticky; Path=/"
        return answer

    deliver(ledger, handler, concurrency=1, chunk_size=2)
    assert cookies == [None] * 4


def test_settling_keeps_each_message_s_last_word(staged: Any) -> None:
    from histimport.records import Outcome, State

    ledger = staged(interleaved(customers=1, per_customer=3))
    first, second, third = (m for _, _, m in WAITING[id(ledger)])
    error = ({"errorCode": "HTTP_503", "errorDescription": "busy"},)
    ledger.record(
        [Outcome(m.id, m.source_uuid, State.FAILED, 503, True, error) for m in (first, second)]
    )
    ledger.record([Outcome(first.id, first.source_uuid, State.ACCEPTED, 200, message_uuid="m-1")])
    ledger.record([Outcome(third.id, third.source_uuid, State.ACCEPTED, 200)])
    ledger.record([Outcome(third.id, third.source_uuid, State.FAILED, 409, False, error)])
    ledger.settle()
    counts = ledger.counts()
    assert (counts["accepted"], counts["failed"]) == (1, 2)
    failures = {f.source_uuid: (f.retryable, f.http_status) for f in ledger.failures()}
    assert failures == {second.source_uuid: (True, 503), third.source_uuid: (False, 409)}


def test_timeout_bounds_the_whole_request(staged: Any) -> None:
    """Each read and write is bounded by --timeout, and so is the request as a whole: an
    answer that trickles in, each part in time, does not hold the customer back forever."""
    ledger = staged(list(interleaved(customers=1, per_customer=2)))

    async def trickle(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return accept_all(request)

    stats = deliver(ledger, trickle, timeout=0.2, max_attempts=1)
    assert (stats.requests, stats.unknown_outcomes) == (1, 1)  # it may have been stored
    failures = list(ledger.failures())
    assert [f.errors[0]["errorCode"] for f in failures] == ["TIMEOUT", "TIMEOUT"]
    assert "twice --timeout (0.4 s)" in failures[0].errors[0]["errorDescription"]
    assert all(f.retryable for f in failures)


@pytest.mark.parametrize(
    ("events", "at", "gives_up"),
    [
        # (seconds, what came back, from which customer), with --give-up-after 100, and 10 s
        # while the platform never answered.
        ([(1, "connect", "a"), (1, "connect", "b")], 10.5, False),
        ([(1, "connect", "a"), (1, "connect", "b")], 11.5, True),  # a wrong URL, most likely
        ([(1, "answer", "a"), (2, "connect", "a"), (2, "connect", "b")], 50.0, False),
        ([(1, "answer", "a"), (2, "5xx", "a"), (3, "5xx", "b")], 102.5, True),
        ([(1, "answer", "a"), (2, "5xx", "a"), (3, "5xx", "b"), (90, "answer", "a")], 150, False),
        ([(1, "answer", "a")], 500.0, False),  # idle, nothing failing: nothing to give up on
        # Counted from the first failure, not from the last answer: a long quiet wait (a
        # Retry-After), then one failure, is no outage.
        ([(1, "answer", "a"), (300, "5xx", "a"), (300, "5xx", "b")], 301.0, False),
        # One customer's failures alone never end the run.
        ([(1, "answer", "a"), (2, "5xx", "a"), (90, "5xx", "a")], 500.0, False),
    ],
)
def test_when_a_dead_platform_is_given_up_on(
    events: list[tuple[float, str, str]], at: float, gives_up: bool
) -> None:
    from histimport.deliver import Health

    health = Health(100.0, first_contact=10.0)
    for moment, what, customer in events:
        if what == "answer":
            health.alive()
        else:
            health.failing(moment, ("d", customer), f"{what} error", answered=what == "5xx")
    verdict = health.verdict(at)
    assert (verdict is not None) == gives_up, verdict
    if verdict is not None:
        assert verdict.endswith("error")


def test_a_platform_answering_500_to_everything_ends_the_run(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=30, per_customer=5)))

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.005)
        return httpx.Response(500, text="boom")

    stats = deliver(ledger, handler, give_up_after=0.4, max_attempts=10_000, chunk_size=2)
    assert stats.gave_up is not None and "failing" in stats.gave_up and "HTTP 500" in stats.gave_up
    counts = ledger.counts()
    assert counts["accepted"] == 0 and counts["notSent"] == 150
    ledger.settle()
    failures = list(ledger.failures())
    assert len(failures) == 150 and all(f.retryable for f in failures)
    # The chunks that were being retried carry the error they were waiting out.
    assert any(f.errors and f.errors[0]["errorCode"] == "HTTP_500" for f in failures)


def test_a_closed_port_before_any_answer_ends_the_run_within_seconds(
    staged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histimport import deliver as module

    monkeypatch.setattr(module, "FIRST_CONTACT_SECONDS", 0.3)
    ledger = staged(list(interleaved(customers=5, per_customer=2)))
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.005)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    stats = deliver(ledger, handler, give_up_after=120, max_attempts=10_000)
    assert stats.gave_up is not None and "unreachable" in stats.gave_up
    assert "never answered" in stats.gave_up and "--give-up-after" not in stats.gave_up
    assert ledger.counts()["notSent"] == 10 and calls > 1


def test_an_outage_shorter_than_give_up_after_is_waited_out(staged: Any) -> None:
    ledger = staged(list(interleaved(customers=20, per_customer=4)))
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.005)
        if 5 < calls <= 60:  # a restart: a while of nothing but 502s
            return httpx.Response(502)
        return accept_all(request)

    stats = deliver(ledger, handler, give_up_after=5, max_attempts=10_000, chunk_size=1)
    assert stats.gave_up is None and ledger.counts()["accepted"] == 80


def test_one_customer_failing_does_not_end_the_run(staged: Any) -> None:
    """Its 500s go on for longer than --give-up-after, but the others' answers show the
    platform alive meanwhile."""
    ledger = staged(list(interleaved(customers=200, per_customer=1)))
    failing = 0.0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal failing
        if customer_of(request) == "cust-00000":
            await asyncio.sleep(0.05)
            failing += 0.05
            return httpx.Response(500, text="poisoned")
        await asyncio.sleep(0.01)
        return accept_all(request)

    stats = deliver(ledger, handler, give_up_after=0.2, max_attempts=8, concurrency=2)
    assert stats.gave_up is None and failing > 0.35
    assert ledger.counts()["accepted"] == 199 and ledger.counts()["failed"] == 1


def test_slots_are_handed_out_in_the_order_they_were_asked_for() -> None:
    """A worker that gives its sender back and asks at once again queues behind the others:
    no customer waits for ever."""
    from histimport.deliver import Slots

    async def scenario() -> list[str]:
        slots = Slots([object()])  # type: ignore[list-item]
        order: list[str] = []

        async def worker(name: str, rounds: int) -> None:
            for _ in range(rounds):
                sender = await slots.take()
                order.append(name)
                await asyncio.sleep(0)
                slots.give(sender)

        await asyncio.gather(worker("a", 3), worker("b", 3), worker("c", 3))
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c"] * 3


def test_the_last_customer_failing_alone_does_not_end_the_run(staged: Any) -> None:
    """The others are done; only the poisoned customer is left: its chunk fails when its
    attempts are used up, as it would on its own."""
    ledger = staged(list(interleaved(customers=2, per_customer=1)))

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.02)
        if customer_of(request) == "cust-00000":
            return httpx.Response(500, text="poisoned")
        return accept_all(request)

    stats = deliver(ledger, handler, give_up_after=0.1, max_attempts=20)
    assert stats.gave_up is None
    assert ledger.counts()["accepted"] == 1 and ledger.counts()["failed"] == 1


def test_a_cancelled_wait_for_a_slot_loses_no_sender() -> None:
    """A second Ctrl-C cancels every worker: one waiting for a slot that is handed over
    just then gives it back, and nothing fails."""
    from histimport.deliver import Slots

    async def scenario() -> bool:
        sender = object()
        slots = Slots([sender])  # type: ignore[list-item]
        held = await slots.take()
        waiting = asyncio.ensure_future(slots.take())
        await asyncio.sleep(0)  # it waits now
        waiting.cancel()
        slots.give(held)  # passes over the cancelled waiter
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await asyncio.wait_for(slots.take(), 1) is sender

    assert asyncio.run(scenario())
