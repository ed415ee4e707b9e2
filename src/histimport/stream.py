"""The stream between reading and delivering. A thread reads, checks and records the rows
(`Reader`) and chunks the messages to send; each full chunk crosses to the event loop that
delivers (`Handoff`), while reading goes on. What crosses is bounded: the reader waits while
the chunks handed on and not yet done with hold more than `HANDOFF_BYTES`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

from .batch import Chunk
from .check import Rejected, Valid
from .chunking import Chunker
from .deliver import Lanes
from .records import Pending
from .staging import Staging

HANDOFF_BYTES = 8 << 20
"""Bodies handed to the delivery and not yet done with, at most (as the reader waits)."""
_BATCH_ROWS = 4096
"""Rows recorded in the ledger together (one transaction)."""
_BATCH_SECONDS = 0.1
"""A batch is recorded after this long even if not full (a slow source, stdin)."""


class Handoff:
    """Chunks from the reader's thread to the event loop's `Lanes`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lanes: Lanes, limit: int) -> None:
        self._loop = loop
        self._lanes = lanes
        self._limit = limit
        self._bytes = 0
        self._stopped = False
        self._condition = threading.Condition()
        lanes.on_done = self._done

    def put(self, chunk: Chunk) -> None:
        """Hand a chunk on, once there is room for it; dropped if the run stops meanwhile
        (its messages stay pending in the ledger: notSent)."""
        size = _size(chunk)
        with self._condition:
            while self._bytes and self._bytes + size > self._limit and not self._stopped:
                self._condition.wait()
            if self._stopped:
                return
            self._bytes += size
        self._call(self._lanes.put, chunk)

    def close(self) -> None:
        """Nothing more comes: the delivery ends once the lanes are empty."""
        self._call(self._lanes.close)

    def stop(self) -> None:
        """The run stops: nothing more is handed on, and a reader waiting for room is let go."""
        with self._condition:
            self._stopped = True
            self._condition.notify_all()

    def _done(self, chunk: Chunk) -> None:
        with self._condition:
            self._bytes -= _size(chunk)
            self._condition.notify_all()

    def _call(self, function: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: the delivery has ended
            self.stop()


def _size(chunk: Chunk) -> int:
    return sum(len(m.body) for m in chunk.messages)


class Reader:
    """Takes the checked rows, records them in batches and hands the messages to send to
    the chunker; at each source's end, the partial chunks follow. Run it in a thread of its
    own (`run`), or in the caller's; `halt` stops it between two rows."""

    def __init__(
        self,
        rows: Iterator[Valid | Rejected],
        staging: Staging,
        chunker: Chunker | None,
        *,
        handed_on: Callable[[int], None] = lambda messages: None,
    ) -> None:
        self._rows = rows
        self._staging = staging
        self._chunker = chunker
        self._handed_on = handed_on
        self._halt = threading.Event()
        self.completed = False  # every row of every source recorded
        self.error: BaseException | None = None

    def halt(self) -> None:
        self._halt.set()

    def run(self) -> None:
        """Read to the end (or the halt); an error is kept in `error` for the caller."""
        try:
            self.read()
        except BaseException as exc:  # noqa: BLE001 - raised again in the run's thread
            self.error = exc

    def read(self) -> None:
        batch: list[Valid | Rejected] = []
        source = None
        started = 0.0
        for row in self._rows:
            if row.source != source:
                if not self._record(batch):
                    return
                if self._chunker is not None:
                    self._chunker.flush()  # the source before ended
                source = row.source
            if not batch:
                started = time.monotonic()
            batch.append(row)
            due = len(batch) >= _BATCH_ROWS or time.monotonic() - started > _BATCH_SECONDS
            if due and not self._record(batch):
                return
        if not self._record(batch):
            return
        self.completed = True
        if self._chunker is not None:
            self._chunker.flush()

    def _record(self, batch: list[Valid | Rejected]) -> bool:
        """Record a batch and hand its messages on; False when the run stopped before."""
        if self._halt.is_set():
            return False
        if not batch:
            return True
        to_send = self._staging.admit(batch)
        batch.clear()
        chunker = self._chunker
        if chunker is not None and to_send:
            self._handed_on(len(to_send))
            for id_, row in to_send:
                chunker.add(row.department, row.customer, Pending(id_, row.source_uuid, row.body))
        return True
