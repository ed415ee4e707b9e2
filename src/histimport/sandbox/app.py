"""The sandbox as a raw ASGI 3 application: the historical-import endpoint and admin views.

PUT /communications/department/{d}/customer/{c}/communication/historical
GET /_sandbox/stats
GET /_sandbox/messages?department=D&customer=C
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, unquote

from .config import SandboxConfig
from .faults import FaultPlan, RequestFault
from .limits import LimiterShape, make_limiter, retry_after_header
from .responses import GARBLED, JSON, Response, error_response, json_response, save_answer
from .store import SandboxStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIX = "communications"
ADMIN = "_sandbox"
#: Largest body read when no max_request_bytes is configured.
BODY_CAP = 64 * 1024 * 1024


class _Disconnected(Exception):
    """The client went away before its request body arrived."""


class _TooLarge(Exception):
    """The request body is larger than the configured limit."""


class SandboxApp:
    """ASGI callable serving one store with the faults of one config."""

    def __init__(self, config: SandboxConfig, store: SandboxStore) -> None:
        self.config = config
        self.store = store
        self._faults = FaultPlan(config)
        self._limiter = None
        # A fixed window counts the seconds of the clock; a bucket, seconds that pass.
        self._clock = time.time if config.rate_window is LimiterShape.FIXED else time.monotonic
        if config.rate_limit:
            self._limiter = make_limiter(config.rate_window, config.rate_limit, config.rate_burst)
        self._lock = threading.Lock()
        self._requests = 0
        self._statuses: Counter[int] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        segments = _raw_segments(scope)
        if len(segments) > 1 and segments[1] == ADMIN:
            response = self._admin(scope, segments)
        else:
            with self._lock:
                self._requests += 1
            try:
                response = await self._api(scope, receive, segments)
            except _Disconnected:
                return
            with self._lock:
                self._statuses[response.status] += 1
            if self.config.latency_ms:
                await asyncio.sleep(self.config.latency_ms / 1000)
        await _send(send, response)

    def stats(self) -> dict[str, Any]:
        """Counts kept by the store (they survive restarts) and by this app (they do not)."""
        with self._lock:
            requests = self._requests
            statuses = {str(status): n for status, n in sorted(self._statuses.items())}
        return {
            "stored": self.store.count(),
            "receipts": self.store.receipt_count(),
            "duplicates": self.store.duplicate_receipts(),
            "requests": requests,
            "statuses": statuses,
        }

    async def _api(self, scope: Scope, receive: Receive, segments: list[str]) -> Response:
        key = _endpoint_key(segments)
        if key is None:
            return error_response(404, "NOT_FOUND", f"no such resource: {scope['path']}")
        departments = self.config.departments
        if departments is not None and key[0] not in departments:
            return error_response(404, "DEPARTMENT_NOT_FOUND", f"no department {key[0]!r}")
        if scope["method"] != "PUT":
            return error_response(
                405, "METHOD_NOT_ALLOWED", "use PUT on this resource", (("Allow", "PUT"),)
            )
        if self._limiter is not None and (wait := self._limiter.take(self._clock())) is not None:
            headers: tuple[tuple[str, str], ...] = ()
            if self.config.rate_retry_after:
                headers = (("Retry-After", retry_after_header(wait)),)
            return error_response(429, "RATE_LIMITED", "too many requests", headers)
        if not self._authorized(scope):
            return error_response(
                401,
                "UNAUTHORIZED",
                "valid Basic credentials are required",
                (("WWW-Authenticate", 'Basic realm="sandbox"'),),
            )
        limit = self.config.max_request_bytes or BODY_CAP
        try:
            body = await _read_body(scope, receive, limit)
        except _TooLarge:
            return error_response(
                413, "PAYLOAD_TOO_LARGE", f"the request body is larger than {limit} bytes"
            )
        if self.config.journal is not None:
            self._write_journal(scope, body)
        content_type = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != JSON.encode():
            return error_response(415, "UNSUPPORTED_MEDIA_TYPE", "send application/json")
        fault = self._faults.next_request_fault()
        if fault is RequestFault.UNAVAILABLE:
            retry_after = self.config.retry_after
            headers = () if retry_after is None else (("Retry-After", _seconds(retry_after)),)
            return error_response(503, "SERVICE_UNAVAILABLE", "try again later", headers)
        messages = _parse_request(body)
        if isinstance(messages, str):
            return error_response(400, "INVALID_REQUEST", messages)
        department, customer = key
        try:
            results = self.store.save(department, customer, messages, reject=self._faults.rejecter)
        except UnicodeEncodeError:
            # JSON may escape half of a surrogate pair alone; no text can hold one.
            return error_response(
                400, "INVALID_REQUEST", "a string holds a lone surrogate (\\ud800 to \\udfff)"
            )
        if fault is RequestFault.ERROR_AFTER_STORE:
            return error_response(500, "INTERNAL_ERROR", "an unexpected error occurred")
        if fault is RequestFault.GARBLE:
            return GARBLED
        return json_response(200, save_answer(results))

    def _write_journal(self, scope: Scope, body: bytes) -> None:
        assert self.config.journal is not None
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k.lower() != b"authorization"
        }
        entry = {"path": scope["path"], "headers": headers, "body": body.decode("utf-8", "replace")}
        with self._lock, self.config.journal.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")

    def _authorized(self, scope: Scope) -> bool:
        if not self.config.requires_auth:
            return True
        scheme, _, token = (_header(scope, b"authorization") or b"").partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except binascii.Error:
            return False
        username, colon, password = decoded.partition(b":")
        # Compare both parts always, so the answer time does not tell which one was wrong.
        user_ok = secrets.compare_digest(username, (self.config.username or "").encode())
        password_ok = secrets.compare_digest(password, (self.config.password or "").encode())
        return bool(colon) and user_ok and password_ok

    def _admin(self, scope: Scope, segments: list[str]) -> Response:
        if len(segments) != 3 or segments[2] not in ("stats", "messages"):
            return error_response(404, "NOT_FOUND", f"no such resource: {scope['path']}")
        if scope["method"] != "GET":
            return error_response(
                405, "METHOD_NOT_ALLOWED", "use GET on this resource", (("Allow", "GET"),)
            )
        if segments[2] == "stats":
            return json_response(200, self.stats())
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        stored = self.store.messages(
            department=query.get("department") or None, customer=query.get("customer") or None
        )
        return json_response(
            200,
            [
                {
                    "department": m.department,
                    "customer": m.customer,
                    "sourceUuid": m.source_uuid,
                    "messageUuid": m.message_uuid,
                    "body": m.body,
                }
                for m in stored
            ],
        )


def _raw_segments(scope: Scope) -> list[str]:
    # Split the still-encoded path, so an encoded "/" inside an id cannot add a segment.
    raw = scope.get("raw_path") or scope["path"].encode()
    return str(raw.decode("latin-1")).split("/")


def _endpoint_key(segments: list[str]) -> tuple[str, str] | None:
    """(department, customer), percent-decoded, when the path is the import endpoint."""
    if len(segments) != 8 or segments[0] != "" or segments[1] != PREFIX:
        return None
    if (segments[2], segments[4], segments[6], segments[7]) != (
        "department",
        "customer",
        "communication",
        "historical",
    ):
        return None
    try:
        department = unquote(segments[3], errors="strict")
        customer = unquote(segments[5], errors="strict")
    except UnicodeDecodeError:
        return None
    if not department or not customer:
        return None
    return department, customer


def _seconds(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else str(value)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    # The server discards whatever is left unread once the answer is sent.
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_request(body: bytes) -> list[object] | str:
    """The request's message list, or what is wrong with the body."""
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return f"the body is not valid JSON: {exc}"
    if not isinstance(payload, dict):
        return "the body must be a JSON object"
    messages = payload.get("saveMessageRequestList")
    if not isinstance(messages, list):
        return "saveMessageRequestList is required and must be an array"
    return messages


async def _send(send: Send, response: Response) -> None:
    headers = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
        *((name.lower().encode(), value.encode("latin-1")) for name, value in response.headers),
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
