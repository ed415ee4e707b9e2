"""SQLite storage of the sandbox: the messages it accepted, and a receipt for every message
it was sent, so tests and rehearsals can count re-sends as well as results."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self


def new_uuid() -> str:
    """A random (version 4) UUID as text, as `uuid.uuid4()` makes it, in a third of the time:
    one is made for every message stored."""
    return _uuid4_text(os.urandom(16).hex())


def new_uuids(n: int) -> list[str]:
    """`n` UUIDs as `new_uuid` makes them, from one `os.urandom` call."""
    h = os.urandom(16 * n).hex()
    return [_uuid4_text(h[at : at + 32]) for at in range(0, 32 * n, 32)]


def _uuid4_text(h: str) -> str:
    """32 random hex digits as a version 4 UUID: the version and variant bits set."""
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    department TEXT NOT NULL,
    customer TEXT NOT NULL,
    source_uuid TEXT NOT NULL UNIQUE,
    message_uuid TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_customer ON messages (department, customer, seq);
CREATE TABLE IF NOT EXISTS receipts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    department TEXT NOT NULL,
    customer TEXT NOT NULL,
    source_uuid TEXT
);
"""


class Outcome(StrEnum):
    """What became of one message of a request."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # its sourceUuid was stored before; kept as it was
    REJECTED = "rejected"  # refused by the reject predicate; not stored
    INVALID = "invalid"  # not an object, or no usable sourceUuid; not stored


class SaveResult(NamedTuple):
    """The outcome for one message, in the order the messages were given. A named tuple: a
    request makes one per message, at a fifth of a frozen dataclass's cost."""

    outcome: Outcome
    source_uuid: str | None
    #: The stored message's id; for a duplicate, the id it was first stored with.
    message_uuid: str | None = None
    #: For an invalid message: an error code and a description of what is wrong.
    error_code: str | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One accepted message, with its body as it was received."""

    seq: int
    department: str
    customer: str
    source_uuid: str
    message_uuid: str
    body: dict[str, Any]


class SandboxStore:
    """Messages and receipts in one SQLite file (WAL), usable from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error:
            self._conn.close()
            raise

    def save(
        self,
        department: str,
        customer: str,
        messages: Sequence[object],
        *,
        reject: Callable[[str], bool] | None = None,
    ) -> list[SaveResult]:
        """Store one request's messages in one transaction and say what became of each.

        A sourceUuid that is already stored is not stored again (the API is idempotent);
        ``reject`` may refuse a message by its sourceUuid.
        """
        results: list[SaveResult] = []
        with self._lock, self._conn:
            for message in messages:
                result = self._save_one(department, customer, message, reject)
                self._conn.execute(
                    "INSERT INTO receipts (department, customer, source_uuid) VALUES (?, ?, ?)",
                    (department, customer, result.source_uuid),
                )
                results.append(result)
        return results

    def _save_one(
        self,
        department: str,
        customer: str,
        message: object,
        reject: Callable[[str], bool] | None,
    ) -> SaveResult:
        if not isinstance(message, dict):
            return SaveResult(
                Outcome.INVALID,
                None,
                error_code="INVALID_MESSAGE",
                problem="the message is not a JSON object",
            )
        source_uuid = message.get("sourceUuid")
        if not isinstance(source_uuid, str) or not source_uuid:
            return SaveResult(
                Outcome.INVALID,
                None,
                error_code="MISSING_SOURCE_UUID",
                problem="sourceUuid is required and must be a non-empty string",
            )
        row = self._conn.execute(
            "SELECT message_uuid FROM messages WHERE source_uuid = ?", (source_uuid,)
        ).fetchone()
        if row is not None:
            return SaveResult(Outcome.DUPLICATE, source_uuid, message_uuid=row[0])
        if reject is not None and reject(source_uuid):
            return SaveResult(Outcome.REJECTED, source_uuid)
        message_uuid = new_uuid()
        body = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        self._conn.execute(
            "INSERT INTO messages (department, customer, source_uuid, message_uuid, body)"
            " VALUES (?, ?, ?, ?, ?)",
            (department, customer, source_uuid, message_uuid, body),
        )
        return SaveResult(Outcome.STORED, source_uuid, message_uuid=message_uuid)

    def messages(
        self, department: str | None = None, customer: str | None = None
    ) -> list[StoredMessage]:
        """The stored messages in the order they were stored, optionally for one key."""
        sql = "SELECT seq, department, customer, source_uuid, message_uuid, body FROM messages"
        clauses: list[str] = []
        params: list[str] = []
        if department is not None:
            clauses.append("department = ?")
            params.append(department)
        if customer is not None:
            clauses.append("customer = ?")
            params.append(customer)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY seq", params).fetchall()
        return [
            StoredMessage(seq, dep, cust, source_uuid, message_uuid, json.loads(body))
            for seq, dep, cust, source_uuid, message_uuid, body in rows
        ]

    def count(self) -> int:
        """Messages stored."""
        return self._scalar("SELECT COUNT(*) FROM messages")

    def receipt_count(self) -> int:
        """Messages received in any request, duplicates and invalid ones included."""
        return self._scalar("SELECT COUNT(*) FROM receipts")

    def duplicate_receipts(self) -> int:
        """Receipts of a sourceUuid that had been received before: the re-sends."""
        return self._scalar("SELECT COUNT(source_uuid) - COUNT(DISTINCT source_uuid) FROM receipts")

    def _scalar(self, sql: str) -> int:
        with self._lock:
            value = self._conn.execute(sql).fetchone()[0]
        return int(value)

    def close(self) -> None:
        """Close the database; calling it again does nothing."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
