"""Build exports for tests: many customers, interleaved as real exports are (by time)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson


def message(department: str, customer: str, n: int, **extra: Any) -> dict[str, Any]:
    """One valid row: the API's message object plus the two ids."""
    row: dict[str, Any] = {
        "departmentUUID": department,
        "customerUUID": customer,
        "sourceUuid": f"{department}.{customer}.{n:06d}",
        "sentOn": f"2024-01-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}+01:00",
        "messageAttributes": {"body": f"message {n} of {customer}", "protocol": "SMS"},
    }
    row.update(extra)
    return row


def interleaved(
    customers: int, per_customer: int, departments: int = 3
) -> Iterator[dict[str, Any]]:
    """Round-robin over customers, so no two neighbouring rows share a customer."""
    for n in range(per_customer):
        for c in range(customers):
            yield message(f"dep-{c % departments}", f"cust-{c:05d}", n)


def write_jsonl(path: Path, rows: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> Path:
    with path.open("wb") as out:
        for row in rows:
            out.write(orjson.dumps(row) + b"\n")
    return path
