"""Check (validate) a mapped row: turn it into a message ready to send, or a rejected record.

Validation is strict about JSON types (a `"true"` string is not a boolean): a row is sent
exactly as it was read, apart from the documented normalisation — time stamps in UTC
`YYYY-MM-DDTHH:MM:SS.sssZ`, and the four notifier flags forced off unless `notify`.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from .logs import utc_text
from .models import NOTIFIER_FLAGS, message_adapter
from .read import RawRow

_ID = re.compile(r"[A-Za-z0-9._~-]+")
_CANONICAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# The separators of the wire form YYYY-MM-DDTHH:MM:SS.sssZ, by position.
_LAYOUT = operator.itemgetter(4, 7, 10, 13, 16, 19, 23)
_WIRE_LAYOUT = ("-", "-", "T", ":", ":", ".", "Z")
_ADAPTER = message_adapter()
# Timestamp fields as (parent object or None, field).
_TIMESTAMPS = ((None, "sentOn"), (None, "receivedOn"), ("voiceCallAttributes", "callDateTime"))
# Fields whose values are message content: never quoted in an error description.
_CONTENT_FIELDS = {"body", "subject", "transcribeText", "metaData", "value"}
_UNQUOTED = {"extra_forbidden", "dict_type", "model_type", "list_type"}
"""Errors whose value is never quoted in a problem: failed.json holds no message text."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a row cannot be sent, in the contract's error shape."""

    code: str
    description: str

    def as_error(self) -> dict[str, str]:
        return {"errorCode": self.code, "errorDescription": self.description}


@dataclass(slots=True)
class Valid:
    """A message ready to stage: its ids and its JSON body, serialised once."""

    source: int
    line: int
    department: str
    customer: str
    source_uuid: str
    body: bytes
    warnings: list[Problem] | None = None


@dataclass(slots=True)
class Rejected:
    """A row that never leaves the machine, with its location and reasons."""

    source: int
    line: int
    department: str | None
    customer: str | None
    source_uuid: str | None
    problems: list[Problem]


def check_row(
    row: RawRow,
    *,
    notify: bool,
    strict: bool = False,
    now: str | None = None,
    max_body: int | None = None,
) -> Valid | Rejected:
    """Validate one raw row; every problem found is reported, not only the first.
    Warnings (`now` enables the one for time stamps in the future) become problems when
    `strict`."""
    if row.data is None:
        error = row.error
        assert error is not None
        return Rejected(
            row.source, row.line, None, None, None, [Problem(error.code, error.description)]
        )
    data = row.data
    problems = [Problem(p.code, p.description) for p in row.problems] if row.problems else []
    department = _path_id(data.pop("departmentUUID", None), "departmentUUID", problems)
    customer = _path_id(data.pop("customerUUID", None), "customerUUID", problems)
    source_uuid = data.get("sourceUuid")
    if source_uuid is None:
        problems.append(Problem("MISSING_FIELD", "sourceUuid: is required"))
    elif not isinstance(source_uuid, str) or not source_uuid.strip():
        problems.append(Problem("INVALID_FIELD", "sourceUuid: must be a non-empty string"))
        source_uuid = None
    try:
        _ADAPTER.validate_python(data, strict=True)
    except ValidationError as exc:
        problems.extend(_describe(exc))
    else:
        _normalise_timestamps(data, problems)
    warnings = _warnings(data, now) if not problems else []
    if strict and warnings:
        problems.extend(warnings)
    if problems:
        return Rejected(row.source, row.line, department, customer, source_uuid, problems)
    assert department is not None and customer is not None and isinstance(source_uuid, str)
    if row.nulls:
        _drop_nulls(data)
    if not notify:
        _silence(data)
    try:
        body = orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        if "64-bit" in str(exc):
            problem = Problem("NUMBER_TOO_LARGE", "a number does not fit in 64 bits")
        else:
            # orjson writes at most 254 levels; the platform would not want more either.
            problem = Problem("TOO_DEEP", "the message is nested too deeply (over 254 levels)")
        return Rejected(row.source, row.line, department, customer, source_uuid, [problem])
    if max_body is not None and len(body) > max_body:
        problem = Problem(
            "MESSAGE_TOO_LARGE",
            f"the message is {len(body)} bytes, more than --max-request-bytes allows in a request",
        )
        return Rejected(row.source, row.line, department, customer, source_uuid, [problem])
    return Valid(row.source, row.line, department, customer, source_uuid, body, warnings or None)


def _warnings(data: dict[str, Any], now: str | None) -> list[Problem]:
    """Suspicious but sendable: reported with their location, blocking only with --strict."""
    found = []
    sent, received = data.get("sentOn"), data.get("receivedOn")
    if sent and received and received < sent:
        found.append(
            Problem("RECEIVED_BEFORE_SENT", f"receivedOn {received} is before sentOn {sent}")
        )
    if now is not None and ((sent and sent > now) or (received and received > now)):
        for name, value in (("sentOn", sent), ("receivedOn", received)):
            if value and value > now:
                found.append(Problem("IN_THE_FUTURE", f"{name} {value} is in the future"))
    attributes = data.get("messageAttributes") or {}
    if (
        not attributes.get("body")
        and not attributes.get("attachments")
        and not data.get("voiceCallAttributes")
    ):
        found.append(Problem("EMPTY_MESSAGE", "the message has neither a body nor attachments"))
    return found


@functools.lru_cache(maxsize=1 << 16)
def is_path_segment(value: str) -> bool:
    """Whether `value` is a valid department, customer or user id: one safe URL path
    segment. Cached: an export names the same departments and customers over and over."""
    return _ID.fullmatch(value) is not None and value not in (".", "..")


def _path_id(value: Any, name: str, problems: list[Problem]) -> str | None:
    """A department or customer id: exactly one safe URL path segment."""
    if type(value) is str and is_path_segment(value):
        return value
    if value is None:
        problems.append(Problem("MISSING_FIELD", f"{name}: is required"))
        return None
    if not isinstance(value, str):
        problems.append(Problem("INVALID_ID", f"{name}: must be a string"))
        return None
    if not is_path_segment(value):
        shown = _excerpt(value)
        problems.append(
            Problem(
                "INVALID_ID",
                f"{name}: {shown} may contain only letters, digits and - . _ ~ "
                "(and is not . or ..)",
            )
        )
        return value if value else None
    return value


def normalise_timestamp(value: str) -> str | None:
    """ISO 8601 with a zone -> UTC `YYYY-MM-DDTHH:MM:SS.sssZ`; None if it is not one."""
    if len(value) == 24 and _LAYOUT(value) == _WIRE_LAYOUT and value.isascii():
        # Already the wire form, if it parses: a third of the general path's cost.
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return None
        return value
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    offset = moment.utcoffset()
    if offset is None:
        return None
    if not offset and _CANONICAL.fullmatch(value):
        return value  # already the wire form (and a real date: fromisoformat checked it)
    return wire_time(moment)


def wire_time(moment: datetime) -> str | None:
    """An aware time as the API takes it: UTC `YYYY-MM-DDTHH:MM:SS.sssZ`; None when that
    falls outside years 1 to 9999 (0001-01-01T00:30+01:00 is in year 0 in UTC)."""
    try:
        return utc_text(moment.astimezone(UTC))
    except OverflowError:
        return None


def _normalise_timestamps(data: dict[str, Any], problems: list[Problem]) -> None:
    for parent, name in _TIMESTAMPS:
        holder = data if parent is None else data.get(parent)
        if holder is None:
            continue
        value = holder.get(name)
        if value is None:
            continue
        normal = normalise_timestamp(value)
        if normal is None:
            path = name if parent is None else f"{parent}.{name}"
            problems.append(
                Problem(
                    "INVALID_TIMESTAMP",
                    f"{path}: {_excerpt(value)} is not a timestamp with a time zone "
                    "(ISO 8601, e.g. 2025-03-28T11:34:43.227Z)",
                )
            )
        elif normal is not value:
            holder[name] = normal


_SILENT = dict.fromkeys(NOTIFIER_FLAGS, False)
_FREE_FORM = {"metaData", "value", "buttonActionEventData"}
"""Objects of the API's whose content is the sender's own: kept as they are, nulls too."""


def _drop_nulls(data: dict[str, Any]) -> None:
    """A null field goes out as an absent one: the API's fields are not nullable."""
    for key in [k for k, v in data.items() if v is None]:
        del data[key]
    for key, value in data.items():
        if key in _FREE_FORM:
            continue
        if type(value) is dict:
            _drop_nulls(value)
        elif type(value) is list:
            for item in value:
                if type(item) is dict:
                    _drop_nulls(item)


def _silence(data: dict[str, Any]) -> None:
    """Historical messages notify nobody: the four notifier flags go out false, and a list
    of additional people to notify goes out empty (the API does not say that the flags
    silence it too)."""
    attributes = data.get("notificationAttributes")
    if isinstance(attributes, dict):
        attributes.update(_SILENT)
        if attributes.get("additionalNotifierNotificationDAUUIDs"):
            attributes["additionalNotifierNotificationDAUUIDs"] = []
    else:
        data["notificationAttributes"] = _SILENT.copy()


_KINDS = {
    "bool_type": "is not a boolean (true or false)",
    "int_type": "is not an integer",
    "string_type": "is not a string",
    "dict_type": "is not an object",
    "model_type": "is not an object",
    "list_type": "is not a list",
    "extra_forbidden": "is not a field of the API's message",
    "missing": "is required",
}


def _describe(exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        path = _dotted(error["loc"])
        kind = _KINDS.get(error["type"], error["msg"])
        if error["type"] in _UNQUOTED or _is_content(error["loc"]):
            # Only a value standing where a scalar belongs is quoted: whatever stands where
            # an object or a list belongs may be a message's text put in the wrong place.
            problems.append(Problem("INVALID_FIELD", f"{path}: {kind}"))
        else:
            problems.append(Problem("INVALID_FIELD", f"{path}: {_excerpt(error['input'])} {kind}"))
    return problems


def _is_content(loc: tuple[int | str, ...]) -> bool:
    return any(part in _CONTENT_FIELDS for part in loc)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _excerpt(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        text = f'"{value}"'
    else:
        try:
            text = orjson.dumps(value).decode()
        except orjson.JSONEncodeError:  # an integer beyond 64 bits
            text = str(value)
    return text if len(text) <= 60 else text[:57] + '..."'
