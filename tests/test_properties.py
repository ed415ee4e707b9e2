"""Property tests: whatever bytes a source holds, reading and checking never raise, and every
non-blank line ends up as a message or a rejected row with its location."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histimport.check import Rejected, Valid, check_row
from histimport.errors import SourceError
from histimport.mapping import Mapper
from histimport.read import read_jsonl
from histimport.read_csv import read_csv

LIMIT = 1 << 16


def stream(data: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]


def non_blank_lines(data: bytes) -> list[int]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return [n + 1 for n, line in enumerate(lines) if line.strip()]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
API_KEYS = [
    "departmentUUID",
    "customerUUID",
    "sourceUuid",
    "sentOn",
    "receivedOn",
    "messageAttributes",
    "notificationAttributes",
    "voiceCallAttributes",
    "userUuid",
    "body",
    "callStatus",
]
rows = st.dictionaries(st.sampled_from(API_KEYS) | st.text(max_size=8), json_values, max_size=8)
line_parts = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"',
        b":",
        b",",
        b"\n",
        b"\r\n",
        b" ",
        b"\xff",
        b"\xef\xbb\xbf",
        b'"departmentUUID":"d"',
        b'"customerUUID":"c"',
        b'"sourceUuid":"s"',
        b"null",
        b"1e999",
        b"\\u0000",
    ]
)
messy = st.lists(line_parts | st.binary(max_size=6), max_size=60).map(b"".join) | st.binary(
    max_size=600
)


@settings(max_examples=300, deadline=None)
@given(messy)
def test_any_bytes_as_jsonl(data: bytes) -> None:
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")  # after a byte-order mark
    number, first = next(((n, line) for n, line in enumerate(lines, 1) if line.strip()), (0, b""))
    if first.strip().startswith(b"[") and not _is_json(first):
        # The opening of a JSON array over several lines (no line here is over LIMIT).
        with pytest.raises(SourceError, match=f"line {number}: a JSON array over several"):
            list(read_jsonl(stream(data), 0, max_line_bytes=LIMIT))
        return
    found = list(read_jsonl(stream(data), 0, max_line_bytes=LIMIT))
    assert [r.line for r in found] == non_blank_lines(data)
    for row in found:
        assert (row.data is None) != (row.error is None)
        if row.data is not None and not row.nulls:
            assert not _holds_none(row.data)  # the walk that drops nulls may be skipped
        checked = check_row(row, notify=False)
        assert isinstance(checked, Valid | Rejected)
        assert checked.line == row.line


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _holds_none(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_holds_none(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_none(v) for v in value)
    return False


@settings(max_examples=300, deadline=None)
@given(messy)
def test_any_bytes_as_csv(data: bytes) -> None:
    lines = data.count(b"\n") + 1
    mapper = Mapper("csv", None, "x.csv", generate_source_uuid=False)
    previous = 0
    for raw in read_csv(
        stream(b"sourceUuid,departmentUUID,customerUUID,sentOn\n" + data), 0, max_line_bytes=LIMIT
    ):
        assert 1 <= raw.line <= lines + 1
        assert raw.line > previous
        previous = raw.line
        row = mapper(raw)
        if row is not None:
            checked = check_row(row, notify=False)
            assert isinstance(checked, Valid | Rejected)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_any_object_is_checked_without_raising(data: dict[str, Any]) -> None:

    line = orjson.dumps(data)
    (row,) = read_jsonl(stream(line + b"\n"), 0, max_line_bytes=LIMIT)
    checked = check_row(row, notify=False)
    if isinstance(checked, Rejected):
        assert checked.problems and all(p.description for p in checked.problems)
    else:
        assert orjson.loads(checked.body)["sourceUuid"] == checked.source_uuid


def _field_names() -> list[str]:
    from pydantic import BaseModel

    from histimport import models

    names: set[str] = set()
    for value in vars(models).values():
        if isinstance(value, type) and issubclass(value, models._Request):
            names.update(value.model_fields)
    assert issubclass(models.SaveMessageRequest, BaseModel) and "messageAttributes" in names
    return sorted(names)


# Objects shaped like messages: known field names at every level, values of any JSON type.
near_messages = st.recursive(
    json_values,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(_field_names()) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=25,
)


def _errors(validate: Any, data: Any) -> list[tuple[str, tuple[Any, ...]]] | None:
    from pydantic import ValidationError

    try:
        validate(data, strict=True)
    except ValidationError as exc:
        kinds = {"model_type": "dict_type"}  # the same "not an object", named after the class
        return sorted((kinds.get(e["type"], e["type"]), e["loc"]) for e in exc.errors())
    return None


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_field_names()), near_messages, max_size=8))
def test_the_message_validator_agrees_with_the_model(data: dict[str, Any]) -> None:
    from pydantic import TypeAdapter

    from histimport.check import _ADAPTER
    from histimport.models import SaveMessageRequest

    model = TypeAdapter(SaveMessageRequest)
    assert _errors(_ADAPTER.validate_python, data) == _errors(model.validate_python, data)


def test_the_message_validator_agrees_on_nested_cases() -> None:
    from pydantic import TypeAdapter

    from histimport.check import _ADAPTER
    from histimport.models import SaveMessageRequest

    model = TypeAdapter(SaveMessageRequest)
    good = {
        "sourceUuid": "s",
        "messageAttributes": {
            "body": "hi",
            "isManual": True,
            "attachments": [{"fileURL": "u"}],
            "messageTags": [{"primaryAttribute": {"value": "v"}, "value": {"any": [1]}}],
        },
        "voiceCallAttributes": {"callStatus": 3},
    }
    assert _errors(_ADAPTER.validate_python, good) is None
    bad = {
        "sourceUuid": 1,
        "messageAttributes": {
            "isManual": "true",
            "attachments": [{"fileURL": 2, "x": 1}, 3],
            "messageTags": [{"secondaryAttributes": [{"value": []}]}],
        },
        "voiceCallAttributes": {"callStatus": 1.5},
        "notificationAttributes": [],
    }
    found = _errors(_ADAPTER.validate_python, bad)
    assert found == _errors(model.validate_python, bad)
    assert found is not None and len(found) == 8


def _normalise_by_the_general_path(value: str) -> str | None:
    import re
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.utcoffset() is None:
        return None
    if not moment.utcoffset() and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value):
        return value
    return f"{moment.astimezone(UTC).isoformat(timespec='milliseconds')[:-6]}Z"


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="0123456789-:T.Z+ W٣", min_size=20, max_size=26)
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
    | st.datetimes().map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z")
)
def test_the_wire_form_shortcut_changes_no_time_stamp(value: str) -> None:
    from histimport.check import normalise_timestamp

    assert normalise_timestamp(value) == _normalise_by_the_general_path(value)
