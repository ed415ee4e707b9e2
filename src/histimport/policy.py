"""The one retry policy: what each answer of the platform means, and how long to wait.

Only the 200 answer is documented, so every other answer is classified here, defensively,
in one table that the rest of the tool obeys:

- retry: connection failures, timeouts, 408 425 429 500 502 503 504, a garbled 200;
- split: 413 (the body was too large for someone on the way);
- abort: 401 403 (the credentials were refused: sending more only locks the account), 407
  (a proxy on the way wants credentials of its own), and a server certificate that cannot
  be verified;
- fail: everything else, with the status and what the body says.

A timeout after the body was sent, a 5xx or a garbled 200 leave the outcome *unknown*: the
server may have stored the messages. They are retried all the same (the platform keys
messages by sourceUuid) and counted as unknown outcomes. Another success with no body (a
202 or 204) is read as an empty answer: it confirms no message, and each is listed as
UNCONFIRMED, for `retry`, instead of being sent again at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any

import httpx
import orjson
from pydantic import ValidationError

from .models import Answer, read_answer
from .records import Outcome, Pending, State
from .transport import ConnectFailed, ProxyRefused, SendError, TimedOut, Untrusted

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
BACKPRESSURE_STATUSES = frozenset({429, 503})
_EXCERPT = 200

_testing = False


def set_testing(on: bool) -> None:
    """Make every backoff zero, so tests of retries never sleep."""
    global _testing
    _testing = on


class Action(Enum):
    ACCEPT = "accept"  # a 200 whose body was read: per-message outcomes follow
    RETRY = "retry"
    SPLIT = "split"
    FAIL = "fail"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one answer (or the lack of one)."""

    action: Action
    status: int | None = None
    code: str = ""
    description: str = ""
    retry_after: float | None = None
    unknown_outcome: bool = False
    backpressure: bool = False
    errors: tuple[dict[str, Any], ...] = ()
    body: Answer | None = None

    def as_errors(self) -> tuple[dict[str, Any], ...]:
        """The errors to list for the messages this decision fails."""
        return self.errors or ({"errorCode": self.code, "errorDescription": self.description},)


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Exponential backoff with full jitter: a random wait in [0, min(cap, base * 2**n)]."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if _testing:
            return 0.0
        if retry_after is not None:
            return min(max(retry_after, 0.0), max(self.cap, retry_after))
        return random.uniform(0.0, min(self.cap, self.base * 2**attempt))


MAX_RETRY_AFTER = 600.0
"""A longer `Retry-After` is cut to this: the chunk still retries, the run does not hang."""


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` in seconds or as an HTTP date, at most MAX_RETRY_AFTER; None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            date = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if date.tzinfo is None:  # the asctime form, which is in GMT (RFC 9110)
            date = date.replace(tzinfo=UTC)
        try:
            seconds = date.timestamp() - now
        except (ValueError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def classify_error(exc: SendError) -> Decision:
    """A request that got no answer."""
    if isinstance(exc, Untrusted):
        # Every request would fail alike, and retrying cannot make the server trusted.
        return Decision(
            Action.ABORT,
            code="TLS_VERIFY_FAILED",
            description="the server's TLS certificate could not be verified "
            "(a corporate CA? pass --ca-bundle)",
        )
    if isinstance(exc, ProxyRefused):
        # The proxy would not open a tunnel to the platform: nothing reached it.
        if exc.status in (401, 403, 407):
            return Decision(
                Action.ABORT,
                code="PROXY_REFUSED",
                description=f"the proxy refused the connection ({exc}): check the proxy "
                "and its credentials in HTTPS_PROXY, or NO_PROXY",
            )
        return Decision(Action.RETRY, code="PROXY_ERROR", description=str(exc))
    if isinstance(exc, ConnectFailed) or (isinstance(exc, TimedOut) and not exc.sent):
        # Nothing reached the server: the outcome is known, nothing was stored.
        return Decision(Action.RETRY, code="CONNECT_ERROR", description=str(exc))
    if isinstance(exc, TimedOut):
        return Decision(Action.RETRY, code="TIMEOUT", description=str(exc), unknown_outcome=True)
    return Decision(
        Action.RETRY, code="CONNECTION_LOST", description=str(exc), unknown_outcome=True
    )


def classify(status: int, headers: httpx.Headers, content: bytes, now: float) -> Decision:
    """An answer: its status, headers and (bounded) body."""
    if 200 <= status < 300:
        if status != 200 and not content.strip():
            return Decision(Action.ACCEPT, status, body={})
        try:
            body = read_answer(content)
        except ValidationError:
            return Decision(
                Action.RETRY,
                status,
                "GARBLED_RESPONSE",
                f"HTTP {status} answer is not the documented JSON: {_excerpt(content)}",
                unknown_outcome=True,
            )
        return Decision(Action.ACCEPT, status, body=body)
    errors = _contract_errors(content)
    if status in (401, 403):
        return Decision(
            Action.ABORT, status, "AUTH_REFUSED", f"HTTP {status}: the credentials were refused"
        )
    if status == 407:
        return Decision(
            Action.ABORT,
            status,
            "PROXY_AUTH_REQUIRED",
            "HTTP 407: a proxy on the way wants credentials: check HTTP_PROXY / HTTPS_PROXY "
            "(user:password@host) or NO_PROXY",
        )
    if status == 413:
        return Decision(Action.SPLIT, status, "REQUEST_TOO_LARGE", f"HTTP 413: {_excerpt(content)}")
    if status in RETRYABLE_STATUSES:
        return Decision(
            Action.RETRY,
            status,
            f"HTTP_{status}",
            f"HTTP {status}: {_excerpt(content)}",
            retry_after=parse_retry_after(headers.get("retry-after"), now),
            # 503 says the service did not take the request; 500, 502, 504 may hide a store.
            unknown_outcome=status >= 500 and status != 503,
            backpressure=status in BACKPRESSURE_STATUSES,
            errors=errors,
        )
    if 300 <= status < 400:
        location = headers.get("location", "(no Location)")
        return Decision(
            Action.FAIL,
            status,
            "REDIRECT_NOT_FOLLOWED",
            f"HTTP {status} to {location}: redirects are not followed, "
            "so credentials never travel elsewhere; check --base-url",
        )
    if status == 404:
        description = (
            "HTTP 404: the department or customer does not exist, or --base-url is wrong: "
            + _excerpt(content)
        )
        return Decision(Action.FAIL, status, "NOT_FOUND", description, errors=errors)
    if status >= 500:
        # 501 and the like: the server says it will never do this.
        return Decision(
            Action.RETRY if status not in (501, 505) else Action.FAIL,
            status,
            f"HTTP_{status}",
            f"HTTP {status}: {_excerpt(content)}",
            unknown_outcome=True,
            errors=errors,
        )
    return Decision(
        Action.FAIL, status, f"HTTP_{status}", f"HTTP {status}: {_excerpt(content)}", errors=errors
    )


def _contract_errors(content: bytes) -> tuple[dict[str, Any], ...]:
    """The contract's `errors` list, when an error answer carries one."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return ()
    if not isinstance(data, dict) or not isinstance(data.get("errors"), list):
        return ()
    return tuple(
        {k: str(v) for k, v in e.items() if k in ("errorCode", "errorDescription", "errorUID")}
        for e in data["errors"][:20]
        if isinstance(e, dict)
    )


def _excerpt(content: bytes) -> str:
    text = content[: _EXCERPT * 4].decode("utf-8", "replace")
    text = " ".join(text.split())
    return (text[:_EXCERPT] + "...") if len(text) > _EXCERPT else (text or "(empty body)")


def outcomes_of(messages: Sequence[Pending], status: int, body: Answer) -> list[Outcome]:
    """Per-message outcomes of a 200 answer.

    Accepted: listed in `succesfullySubmittedSourceUuids`. Failed: listed in
    `failedSourceUuids` or carrying its own errors (not retryable: the server judged it).
    A message the answer does not mention is failed as `UNCONFIRMED`, retryable.
    """
    succeeded = body.get("succesfullySubmittedSourceUuids")
    ok = set(succeeded or ())
    failed = set(body.get("failedSourceUuids") or ())
    entries = {
        e["sourceUuid"]: e for e in body.get("saveMessageResponse") or () if e.get("sourceUuid")
    }
    request_errors = _dump(body.get("errors"))
    outcomes = []
    accepted, refused = State.ACCEPTED, State.FAILED
    for m in messages:
        source_uuid = m.source_uuid
        entry = entries.get(source_uuid)
        listed = entry.get("errors") if entry else None
        own_errors = _dump(listed) if listed else ()
        if own_errors or source_uuid in failed:
            errors = own_errors or request_errors or (_error("FAILED", "listed as failed"),)
            outcomes.append(Outcome(m.id, source_uuid, refused, status, False, errors))
        elif source_uuid in ok or (succeeded is None and entry is not None):
            message_uuid = entry.get("messageUuid") if entry else None
            outcomes.append(Outcome(m.id, source_uuid, accepted, status, False, (), message_uuid))
        else:
            errors = request_errors or (
                _error("UNCONFIRMED", "the answer neither accepted nor refused this message"),
            )
            outcomes.append(Outcome(m.id, m.source_uuid, State.FAILED, status, True, errors))
    return outcomes


def server_warnings(body: Answer) -> list[tuple[str | None, str, dict[str, Any]]]:
    """The answer's warnings: (sourceUuid, or None for the request's own; code; the
    warning as it came)."""
    found = [(None, w) for w in body.get("warnings") or ()]
    for entry in body.get("saveMessageResponse") or ():
        found += [(entry.get("sourceUuid"), w) for w in entry.get("warnings") or ()]
    return [(uuid, str(w.get("warningCode") or "UNSPECIFIED"), w) for uuid, w in found]


def warning_excerpt(warning: dict[str, Any]) -> str:
    """A warning's description, cut as an error's is."""
    return _excerpt(str(warning.get("warningDescription") or "").encode())


def _dump(errors: list[dict[str, Any]] | None) -> tuple[dict[str, Any], ...]:
    """The contract's errors, without the fields the answer left empty, nor the errors that
    say nothing at all (`{"errorCode": null}` refuses no message)."""
    said = ({k: v for k, v in e.items() if v is not None} for e in errors or ())
    return tuple(e for e in said if e)


def _error(code: str, description: str) -> dict[str, Any]:
    return {"errorCode": code, "errorDescription": description}
