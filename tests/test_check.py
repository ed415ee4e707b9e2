"""Map & validate: every rule of the contract's input shape, as a rejected row or a message."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from histimport.check import Rejected, Valid, check_row, normalise_timestamp
from histimport.read import RawRow, RowError, parse_json_line

from .factory import message


def check(data: dict[str, Any], notify: bool = False) -> Valid | Rejected:
    return check_row(RawRow(0, 7, data), notify=notify)


def reasons(result: Valid | Rejected) -> list[str]:
    assert isinstance(result, Rejected), result
    return [p.description for p in result.problems]


def test_a_valid_row_is_sent_unchanged_but_for_the_documented_normalisation() -> None:
    row = message("dep", "cust", 1, userUuid="u-1")
    row["messageAttributes"]["metaData"] = {"legacy": {"id": 7, "flags": [1, 2]}}
    result = check(row)
    assert isinstance(result, Valid)
    assert (result.department, result.customer, result.source_uuid) == (
        "dep",
        "cust",
        row["sourceUuid"],
    )
    sent = orjson.loads(result.body)
    assert "departmentUUID" not in sent and "customerUUID" not in sent
    assert sent["sentOn"] == "2023-12-31T23:00:01.000Z"
    assert sent["messageAttributes"] == row["messageAttributes"]
    assert sent["userUuid"] == "u-1"


def test_notifier_flags_are_forced_off_unless_notify() -> None:
    row = message("d", "c", 1)
    row["notificationAttributes"] = {
        "internalSubscribersNotifierPop": True,
        "sendPhoneNotification": True,
        "additionalNotifierNotificationDAUUIDs": ["x"],
    }
    silent = orjson.loads(
        check(dict(row, notificationAttributes=dict(row["notificationAttributes"]))).body
    )  # type: ignore[union-attr]
    assert silent["notificationAttributes"] == {
        "internalSubscribersNotifierPop": False,
        "externalSubscribersNotifierPop": False,
        "threadOwnerNotifierPop": False,
        "sendPhoneNotification": False,
        "additionalNotifierNotificationDAUUIDs": [],
    }
    bare = orjson.loads(check(message("d", "c", 2)).body)  # type: ignore[union-attr]
    assert set(bare["notificationAttributes"].values()) == {False}
    loud = orjson.loads(check(row, notify=True).body)  # type: ignore[union-attr]
    assert loud["notificationAttributes"]["internalSubscribersNotifierPop"] is True
    assert loud["notificationAttributes"]["additionalNotifierNotificationDAUUIDs"] == ["x"]


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "", "a?b", "a#b", "a b", "ä", "a%2Fb"])
def test_path_ids_must_be_one_safe_segment(bad: str) -> None:
    (reason,) = reasons(check(message("dep", bad, 1)))
    assert reason.startswith("customerUUID: ")


def test_required_ids() -> None:
    row = message("d", "c", 1)
    for key in ("departmentUUID", "customerUUID", "sourceUuid"):
        del row[key]
    assert reasons(check(row)) == [
        "departmentUUID: is required",
        "customerUUID: is required",
        "sourceUuid: is required",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sentOn": "yesterday"}, 'sentOn: "yesterday" is not a timestamp'),
        ({"sentOn": "2024-01-01T10:00:00"}, 'sentOn: "2024-01-01T10:00:00" is not a timestamp'),
        (
            {"messageAttributes": {"isManual": "maybe"}},
            'messageAttributes.isManual: "maybe" is not a boolean',
        ),
        ({"messageAttributes": {"isManual": "true"}}, "messageAttributes.isManual:"),
        (
            {"voiceCallAttributes": {"callStatus": "3"}},
            'voiceCallAttributes.callStatus: "3" is not an integer',
        ),
        (
            {"voiceCallAttributes": {"callStatus": 1.5}},
            "voiceCallAttributes.callStatus: 1.5 is not an integer",
        ),
        ({"messageAttributes": {"bodyy": "x"}}, "messageAttributes.bodyy: is not a field"),
        ({"messageAttributes": {"tags": "TRASH"}}, "messageAttributes.tags: is not a list"),
        (
            {"messageAttributes": {"attachments": [{"mimeType": 3}]}},
            "messageAttributes.attachments[0].mimeType: 3",
        ),
        ({"sourceUuid": ""}, "sourceUuid: must be a non-empty string"),
    ],
)
def test_wrong_types_are_named_in_plain_words(change: dict[str, Any], expected: str) -> None:
    (reason,) = reasons(check(message("d", "c", 1, **change)))
    assert reason.startswith(expected)


@pytest.mark.parametrize(
    "change",
    [
        {"messageAttributes": {"body": ["secret words"]}},
        {"messageAttributes": "secret words put where an object belongs"},
        {"voiceCallAttributes": "secret transcript"},
        {"messageAttributes": {"body": "x", "attachments": ["https://files/secret.pdf"]}},
        {"notificationAttributes": {"notificationButtons": "secret"}},
    ],
)
def test_message_content_is_never_quoted_in_a_reason(change: dict[str, Any]) -> None:
    (reason,) = reasons(check(message("d", "c", 1, **change)))
    assert "secret" not in reason


def test_an_unreadable_row_keeps_its_location() -> None:
    result = check_row(
        RawRow(2, 41, None, RowError("INVALID_JSON", "line is not valid JSON")), notify=False
    )
    assert isinstance(result, Rejected)
    assert (result.source, result.line, result.source_uuid) == (2, 41, None)


def test_nesting_too_deep_to_send_is_rejected_not_raised() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(400):
        node["a"] = {}
        node = node["a"]
    (reason,) = reasons(check(message("d", "c", 1, messageAttributes={"metaData": deep})))
    assert "nested too deeply" in reason


@pytest.mark.parametrize(
    ("given", "utc"),
    [
        ("2025-03-28T11:34:43.227Z", "2025-03-28T11:34:43.227Z"),
        ("2025-03-28T11:34:43Z", "2025-03-28T11:34:43.000Z"),
        ("2025-03-28T12:34:43.2279+01:00", "2025-03-28T11:34:43.227Z"),
        ("2025-03-30T03:30:00+02:00", "2025-03-30T01:30:00.000Z"),
        ("2025-03-28 11:34:43-05:30", "2025-03-28T17:04:43.000Z"),
    ],
)
def test_timestamps_are_normalised_to_utc_milliseconds(given: str, utc: str) -> None:
    assert normalise_timestamp(given) == utc


@pytest.mark.parametrize("parsed", [False, True], ids=["row", "json-line"])
def test_a_null_field_goes_out_as_an_absent_one_but_free_form_content_is_kept(
    parsed: bool,
) -> None:
    row = message("d", "c", 1, receivedOn=None, userUuid=None, voiceCallAttributes=None)
    row["messageAttributes"].update(
        subject=None, metaData={"ref": None, "deep": {"x": None}}, attachments=[{"fileURL": None}]
    )
    # A JSON line says whether it holds a null at all; a row built otherwise may.
    raw = parse_json_line(orjson.dumps(row), 0, 7) if parsed else RawRow(0, 7, row)
    body = orjson.loads(check_row(raw, notify=False).body)  # type: ignore[union-attr]
    assert {"receivedOn", "userUuid", "voiceCallAttributes"}.isdisjoint(body)
    assert "subject" not in body["messageAttributes"]
    assert body["messageAttributes"]["metaData"] == {"ref": None, "deep": {"x": None}}
    assert body["messageAttributes"]["attachments"] == [{}]


def test_a_json_line_without_a_null_is_sent_as_parsed() -> None:
    line = orjson.dumps(message("d", "c", 1, userUuid="agent-1", sentOn="2024-01-01T00:00:01.000Z"))
    raw = parse_json_line(line, 0, 7)
    assert not raw.nulls
    result = check_row(raw, notify=True)
    assert isinstance(result, Valid)
    expected = orjson.loads(line)
    del expected["departmentUUID"], expected["customerUUID"]
    assert orjson.loads(result.body) == expected
