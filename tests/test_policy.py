"""The retry policy's table: one test per rule."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import orjson
import pytest

from histimport import policy
from histimport.models import read_answer
from histimport.policy import (
    Action,
    Backoff,
    classify,
    classify_error,
    outcomes_of,
    parse_retry_after,
)
from histimport.records import Pending, State
from histimport.transport import (
    ConnectFailed,
    ConnectionLost,
    ProtocolBroken,
    SendError,
    TimedOut,
    Untrusted,
    translated,
)

OK_BODY = orjson.dumps({"succesfullySubmittedSourceUuids": ["a"], "failedSourceUuids": []})


def decide(status: int, content: bytes = b"", **headers: str) -> policy.Decision:
    return classify(status, httpx.Headers(headers), content, now=1_000_000.0)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    decision = decide(status, b"<html>busy</html>")
    assert decision.action is Action.RETRY
    assert decision.unknown_outcome is (status >= 500 and status != 503)
    assert decision.backpressure is (status in (429, 503))


@pytest.mark.parametrize(
    "content", [b"<html>ok</html>", b"", b"[1]", b'{"succesfullySubmittedSourceUuids": "a"}']
)
def test_a_garbled_200_is_retried_as_an_unknown_outcome(content: bytes) -> None:
    decision = decide(200, content)
    assert (decision.action, decision.code, decision.unknown_outcome) == (
        Action.RETRY,
        "GARBLED_RESPONSE",
        True,
    )


def test_an_answer_after_a_byte_order_mark_is_read() -> None:
    decision = decide(200, b"\xef\xbb\xbf" + OK_BODY)
    assert decision.action is Action.ACCEPT
    assert decision.body is not None and decision.body["succesfullySubmittedSourceUuids"] == ["a"]


def test_a_proxy_that_wants_credentials_stops_the_run() -> None:
    decision = decide(407, b"<html>Proxy Authentication Required</html>")
    assert (decision.action, decision.code) == (Action.ABORT, "PROXY_AUTH_REQUIRED")


def test_an_error_that_says_nothing_refuses_no_message() -> None:
    body = read_answer(
        b'{"succesfullySubmittedSourceUuids": ["a"], "saveMessageResponse": '
        b'[{"sourceUuid": "a", "messageUuid": "m", "errors": [{"errorCode": null}]}]}'
    )
    (outcome,) = outcomes_of([Pending(1, "a", b"{}")], 200, body)
    assert (outcome.state, outcome.errors, outcome.message_uuid) == (State.ACCEPTED, (), "m")


def test_a_documented_200_is_read() -> None:
    decision = decide(200, OK_BODY)
    assert decision.action is Action.ACCEPT
    assert decision.body is not None and decision.body["succesfullySubmittedSourceUuids"] == ["a"]


def test_the_correct_spelling_is_read_too() -> None:
    body = read_answer(b'{"successfullySubmittedSourceUuids": ["x"]}')
    assert body["succesfullySubmittedSourceUuids"] == ["x"]
    odd = read_answer(b'{"successfullySubmittedSourceUuids": ["x", 1], "warnings": [2]}')
    assert odd["succesfullySubmittedSourceUuids"] == ["x"]


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_abort(status: int) -> None:
    assert decide(status).action is Action.ABORT


def test_413_splits() -> None:
    assert decide(413, b"<html>Request Entity Too Large</html>").action is Action.SPLIT


def test_redirects_fail_naming_the_location() -> None:
    decision = decide(307, location="https://elsewhere.example/x")
    assert decision.action is Action.FAIL
    assert "https://elsewhere.example/x" in decision.description


def test_404_fails_not_retryable() -> None:
    decision = decide(404, b'{"errors": [{"errorCode": "DEPARTMENT_NOT_FOUND"}]}')
    assert decision.action is Action.FAIL
    assert decision.as_errors() == ({"errorCode": "DEPARTMENT_NOT_FOUND"},)


@pytest.mark.parametrize("status", [400, 409, 422])
def test_other_4xx_fail_with_a_bounded_excerpt(status: int) -> None:
    decision = decide(status, b"x" * 10_000)
    assert decision.action is Action.FAIL
    assert len(decision.description) < 300


def failure(exc: httpx.HTTPError) -> SendError:
    """What the transport boundary makes of one of httpx's exceptions."""
    try:
        with translated():
            raise exc
    except SendError as translated_error:
        return translated_error
    raise AssertionError("not translated")


@pytest.mark.parametrize(
    ("error", "kind", "code", "unknown"),
    [
        (httpx.ConnectError("[Errno 111] refused"), ConnectFailed, "CONNECT_ERROR", False),
        (httpx.ConnectTimeout("slow to connect"), TimedOut, "CONNECT_ERROR", False),
        (httpx.PoolTimeout("no connection"), TimedOut, "CONNECT_ERROR", False),
        (httpx.WriteTimeout("slow to take it"), TimedOut, "TIMEOUT", True),
        (httpx.ReadTimeout("slow to answer"), TimedOut, "TIMEOUT", True),
        (httpx.RemoteProtocolError("closed"), ConnectionLost, "CONNECTION_LOST", True),
        (httpx.ReadError("reset"), ConnectionLost, "CONNECTION_LOST", True),
        (httpx.WriteError("broken pipe"), ConnectionLost, "CONNECTION_LOST", True),
        (httpx.LocalProtocolError("bad"), ProtocolBroken, "CONNECTION_LOST", True),
        (httpx.DecodingError("corrupt gzip"), ProtocolBroken, "CONNECTION_LOST", True),
    ],
)
def test_transport_errors(
    error: httpx.HTTPError, kind: type[SendError], code: str, unknown: bool
) -> None:
    """Translated once, at the transport, then read by the policy: what did not reach the
    server is a known outcome; anything after the request left may hide a stored message."""
    translated_error = failure(error)
    assert type(translated_error) is kind
    decision = classify_error(translated_error)
    assert (decision.action, decision.code, decision.unknown_outcome) == (
        Action.RETRY,
        code,
        unknown,
    )
    assert str(error) in decision.description


def test_an_untrusted_certificate_stops_the_run() -> None:
    error = failure(httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] self-signed"))
    assert isinstance(error, Untrusted)
    assert classify_error(error).action is Action.ABORT


def test_a_proxy_that_will_not_open_a_tunnel() -> None:
    """Nothing reached the platform: a refusal stops the run as wrong credentials do, and
    anything else is retried as a known outcome."""
    refused = classify_error(failure(httpx.ProxyError("407 Proxy Authentication Required")))
    assert (refused.action, refused.code) == (Action.ABORT, "PROXY_REFUSED")
    assert "407 Proxy Authentication Required" in refused.description
    failing = classify_error(failure(httpx.ProxyError("502 Bad Gateway")))
    assert (failing.action, failing.code, failing.unknown_outcome) == (
        Action.RETRY,
        "PROXY_ERROR",
        False,
    )


def test_retry_after_in_both_forms() -> None:
    now = 1_000_000.0
    assert parse_retry_after("7", now) == 7.0
    date = format_datetime(datetime.fromtimestamp(now, UTC) + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30.0, abs=1.0)
    assert parse_retry_after("soon", now) is None
    assert decide(429, **{"retry-after": "3"}).retry_after == 3.0


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Tokyo"])
def test_a_retry_after_date_in_the_asctime_form_is_gmt(
    monkeypatch: pytest.MonkeyPatch, zone: str
) -> None:
    """The obsolete forms carry no zone; RFC 9110 says they are GMT, whatever the local
    time zone of the machine."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        now = 1_000_000.0
        later = datetime.fromtimestamp(now, UTC) + timedelta(seconds=30)
        for form in ("%a %b %d %H:%M:%S %Y", "%A, %d-%b-%y %H:%M:%S GMT"):
            assert parse_retry_after(later.strftime(form), now) == pytest.approx(30.0, abs=1.0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_backoff_has_full_jitter_under_a_cap() -> None:
    policy.set_testing(False)
    try:
        backoff = Backoff(base=0.5, cap=4.0)
        delays = [backoff.delay(attempt) for attempt in range(1, 12) for _ in range(20)]
        assert all(0.0 <= d <= 4.0 for d in delays)
        assert max(delays) > 2.0 and min(delays) < 0.5
        assert backoff.delay(1, retry_after=9.0) == 9.0
    finally:
        policy.set_testing(True)
    assert Backoff().delay(5) == 0.0


def pending(*uuids: str) -> list[Pending]:
    return [Pending(i, u, b"{}") for i, u in enumerate(uuids)]


def test_settle_per_message() -> None:
    body = read_answer(
        orjson.dumps(
            {
                "saveMessageResponse": [
                    {"sourceUuid": "a", "messageUuid": "m-a"},
                    {
                        "sourceUuid": "b",
                        "errors": [{"errorCode": "BAD_BODY", "errorDescription": "no"}],
                    },
                ],
                "succesfullySubmittedSourceUuids": ["a"],
                "failedSourceUuids": ["b", "c"],
            }
        )
    )
    a, b, c, d = outcomes_of(pending("a", "b", "c", "d"), 200, body)
    assert (a.state, a.message_uuid) == (State.ACCEPTED, "m-a")
    assert (b.state, b.retryable, b.errors) == (
        State.FAILED,
        False,
        ({"errorCode": "BAD_BODY", "errorDescription": "no"},),
    )
    assert (c.state, c.retryable) == (State.FAILED, False)
    assert (d.state, d.retryable, d.errors[0]["errorCode"]) == (State.FAILED, True, "UNCONFIRMED")


@pytest.mark.parametrize(
    "value", ["inf", "nan", "-inf", "1e999", "1e9", "Fri, 01 Jan 2999 00:00:00 GMT"]
)
def test_an_absurd_retry_after_never_hangs_the_run(value: str) -> None:
    seconds = parse_retry_after(value, 1_000_000.0)
    assert seconds is None or 0.0 <= seconds <= policy.MAX_RETRY_AFTER


@pytest.mark.parametrize(
    "answer",
    [
        {"succesfullySubmittedSourceUuids": ["a", 5], "warnings": [1, "x", None]},
        {
            "saveMessageResponse": [7, {"sourceUuid": "b", "errors": [5, {"errorCode": 409}]}],
            "succesfullySubmittedSourceUuids": ["a"],
            "errors": "none",
        },
    ],
)
def test_odd_details_do_not_hide_an_explicit_success(answer: dict[str, object]) -> None:
    decision = decide(200, orjson.dumps(answer))
    assert decision.action is Action.ACCEPT and decision.body is not None
    outcomes = outcomes_of(pending("a", "b"), 200, decision.body)
    assert outcomes[0].state is State.ACCEPTED
    if "saveMessageResponse" in answer:
        assert outcomes[1].errors == ({"errorCode": "409"},)


def test_the_quick_and_the_lenient_reading_of_an_answer_agree() -> None:
    from histimport.models import SaveMessageResponseBody

    answer = orjson.dumps(
        {
            "saveMessageResponse": [
                {"sourceUuid": "a", "messageUuid": "m-a", "errors": [], "warnings": []},
                {"sourceUuid": "b", "errors": [{"errorCode": "E", "errorUID": None}]},
                {"sourceUuid": "c", "messageUuid": None, "warnings": [{"warningCode": "W"}]},
                {"messageUuid": "m-x", "extra": {"ignored": True}},
            ],
            "succesfullySubmittedSourceUuids": ["a", "c"],
            "failedSourceUuids": ["b"],
            "errors": None,
            "warnings": [{"warningCode": "W2", "warningDescription": "d"}],
        }
    )
    lenient = SaveMessageResponseBody.model_validate_json(answer).model_dump(exclude_none=True)
    quick = read_answer(answer)
    messages = pending("a", "b", "c", "d")
    assert outcomes_of(messages, 200, quick) == outcomes_of(messages, 200, lenient)
    assert policy.server_warnings(quick) == policy.server_warnings(lenient)
    assert len(policy.server_warnings(quick)) == 2
