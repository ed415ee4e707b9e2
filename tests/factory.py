"""Build exports for tests: many customers, interleaved as real exports are (by time)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from histimport.check import check_row
from histimport.chunking import Chunker
from histimport.deliver import Deliverer, DeliveryStats, Lanes
from histimport.ledger import Ledger
from histimport.read import RawRow
from histimport.records import Pending
from histimport.staging import Staging
from histimport.stream import Reader


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


Waiting = list[tuple[str, str, Pending]]
"""Messages recorded and waiting to be sent: (department, customer, message), in order."""


@contextmanager
def recording(
    ledger: Ledger, state_dir: Path, *, carry_refused: bool = True
) -> Iterator[tuple[Staging, Callable[[Iterable[dict[str, Any]]], list[Any]]]]:
    """The staging of the ledger's run, and `checked(rows)`: the rows checked as the next
    lines (1, 2...) of one source, ready to record."""
    staging = Staging(
        state_dir,
        run_id=ledger.run_id,
        target=ledger.target,
        paths=["source.jsonl"],
        carry_refused=carry_refused,
    )
    lines = itertools.count(1)

    def checked(rows: Iterable[dict[str, Any]]) -> list[Any]:
        return [check_row(RawRow(0, next(lines), r), notify=False) for r in rows]

    try:
        yield staging, checked
    finally:
        staging.close()


def stage(
    ledger: Ledger,
    state_dir: Path,
    rows: Iterable[dict[str, Any]],
    *,
    carry_refused: bool = True,
) -> Waiting:
    """Check rows (as lines 1, 2... of one source) and record them in the ledger's run, as
    a load does; the messages to send."""
    with recording(ledger, state_dir, carry_refused=carry_refused) as (staging, checked):
        to_send = staging.admit(checked(rows))
    return [(r.department, r.customer, Pending(i, r.source_uuid, r.body)) for i, r in to_send]


def deliver_waiting(deliverer: Deliverer, waiting: Waiting) -> DeliveryStats:
    """Chunk the waiting messages as a load does and deliver them."""

    async def main() -> DeliveryStats:
        config = deliverer.config
        lanes = Lanes(ordered=not config.unordered)
        chunker = Chunker(
            lanes.put,
            chunk_size=config.chunk_size,
            max_bytes=lambda: deliverer.max_bytes,
            envelope=deliverer.envelope,
        )
        for department, customer, message in waiting:
            chunker.add(department, customer, message)
        chunker.flush()
        lanes.close()
        return await deliverer.run(lanes)

    return asyncio.run(main())


@contextmanager
def stopped_after(rows: int) -> Iterator[None]:
    """Ctrl-C (a real SIGINT) once `rows` rows were recorded in the ledger, the rows read
    after them not recorded: as a run stopped while reading leaves it."""
    record = Reader._record

    def interrupted(self: Reader, batch: list[Any]) -> bool:
        room = rows - self._staging.rows
        if room >= len(batch):
            return record(self, batch)
        record(self, batch[:room])
        batch.clear()
        os.kill(os.getpid(), signal.SIGINT)
        if threading.current_thread() is not threading.main_thread():
            # Reading in a thread of its own: the run's handler stops it.
            assert self._halt.wait(10), "the run did not stop reading"
            return False
        time.sleep(10)  # the handler raises KeyboardInterrupt here
        raise AssertionError("Ctrl-C did not interrupt the run")

    Reader._record = interrupted  # type: ignore[method-assign]
    try:
        yield
    finally:
        Reader._record = record  # type: ignore[method-assign]
