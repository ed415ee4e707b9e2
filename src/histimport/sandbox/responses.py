"""The sandbox's answers: the vendor's 200 body, JSON error bodies and the garbled page."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .store import Outcome, SaveResult, new_uuid

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Response:
    """A complete HTTP answer, sent in one piece."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = JSON


def json_response(
    status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    body = orjson.dumps(payload)
    return Response(status, body, headers)


def api_error(code: str, description: str) -> dict[str, str]:
    """An error in the vendor's shape, with a fresh id as a real service would log it."""
    return {"errorCode": code, "errorDescription": description, "errorUID": new_uuid()}


def error_response(
    status: int, code: str, description: str, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """A non-200 answer; the vendor documents none, so it reuses the 200 body's error list."""
    return json_response(
        status, {"errors": [api_error(code, description)], "warnings": []}, headers
    )


def save_answer(results: Sequence[SaveResult]) -> dict[str, Any]:
    """The 200 body (``SaveMessageResponseBody``) for one request's results."""
    entries: list[dict[str, Any]] = []
    succeeded: list[str] = []
    failed: list[str] = []
    stored, duplicate, rejected = Outcome.STORED, Outcome.DUPLICATE, Outcome.REJECTED
    for outcome, source_uuid, message_uuid, error_code, problem in results:
        if outcome is stored and source_uuid is not None and message_uuid is not None:
            # Nearly every result: the short way.
            entries.append(
                {
                    "sourceUuid": source_uuid,
                    "messageUuid": message_uuid,
                    "errors": [],
                    "warnings": [],
                }
            )
            succeeded.append(source_uuid)
            continue
        entry: dict[str, Any] = {}
        if source_uuid is not None:
            entry["sourceUuid"] = source_uuid
        if message_uuid is not None:
            entry["messageUuid"] = message_uuid
        errors: list[dict[str, str]] = []
        warnings: list[dict[str, str]] = []
        if outcome is duplicate:
            warnings.append(
                {
                    "warningCode": "DUPLICATE_SOURCE_UUID",
                    "warningDescription": f"sourceUuid {source_uuid} was already "
                    f"stored as message {message_uuid}; it was not stored again",
                }
            )
        elif outcome is rejected:
            errors.append(api_error("REJECTED", "the message was rejected by the sandbox"))
        elif outcome is Outcome.INVALID:
            errors.append(api_error(error_code or "INVALID_MESSAGE", problem or "invalid"))
        entry["errors"] = errors
        entry["warnings"] = warnings
        entries.append(entry)
        if source_uuid is not None:
            (failed if errors else succeeded).append(source_uuid)
    # "succesfully" is the vendor's spelling of the key.
    return {
        "saveMessageResponse": entries,
        "succesfullySubmittedSourceUuids": succeeded,
        "failedSourceUuids": failed,
        "errors": [],
        "warnings": [],
    }


GARBLED = Response(
    200,
    b"<!DOCTYPE html>\n<html><head><title>Service Temporarily Unavailable</title></head>\n"
    b"<body><h1>Service Temporarily Unavailable</h1>\n"
    b"<p>The upstream server returned an invalid response.</p></body></html>\n",
    content_type="text/html; charset=utf-8",
)
