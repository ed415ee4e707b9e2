"""Recording rows as they are read: each checked row takes its place in the ledger, in input
order, a batch at a time, before anything of it is sent. A message gets its id and its
state there: to send, or not, because an earlier row has its sourceUuid (rejected, as a
duplicate), the platform accepted it before (skipped), or refused it for good (carried).
Only ids and states are written: the bodies go on to the chunking.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .check import Rejected, Valid
from .ledger import connect, writes
from .records import Outcome, State
from .signals import deferred

_THIS_RUN = """
WITH u(v) AS (SELECT DISTINCT value FROM json_each(:uuids))
SELECT v, 0, m.src, m.line, NULL FROM u JOIN msg m ON m.source_uuid = v
UNION ALL SELECT v, 0, r.src, r.line, NULL FROM u JOIN rejected r ON r.source_uuid = v"""
"""Where a row of this run had one of a batch's sourceUuids (0)."""
_LOOKUP = f"""{_THIS_RUN}
UNION ALL SELECT v, 1, a.run_id, NULL, NULL FROM u
    JOIN accepted a ON a.target = :target AND a.source_uuid = v
UNION ALL SELECT v, 2, r.http_status, NULL, r.errors FROM u
    JOIN refused r ON r.target = :target AND r.source_uuid = v
"""
"""What the ledger knows of a batch's sourceUuids: where a row of this run had one (0), the
run that had it accepted (1), its refusal for good (2)."""
_REJECTED = """
WITH u(v) AS (SELECT DISTINCT value FROM json_each(:uuids))
SELECT v, 0, r.src, r.line, NULL FROM u JOIN rejected r ON r.source_uuid = v"""
"""Where a rejected row of this run had one of a batch's sourceUuids (0)."""


def _repeats_a_rejected_row(rows: Sequence[Valid | Rejected]) -> bool:
    """Whether a message of the batch has the sourceUuid of a rejected row of the batch,
    which the unique index does not hold."""
    rejected = {r.source_uuid for r in rows if isinstance(r, Rejected) and r.source_uuid}
    return bool(rejected) and any(isinstance(r, Valid) and r.source_uuid in rejected for r in rows)


class _Repeated(Exception):
    """A batch has a sourceUuid that a row recorded before had: it was not recorded."""


@dataclass(slots=True)
class _Found:
    """What the ledger knows of a batch's sourceUuids (see `_LOOKUP`)."""

    first: dict[str, tuple[int, int]]  # the earliest row of this run with it
    accepted: dict[str, int] = field(default_factory=dict)  # the run that had it accepted
    refused: dict[str, tuple[int | None, bytes | None]] = field(default_factory=dict)


_LOG_PAGES = 2_500
"""Pages (10 MB) of the staging's write-ahead log past which recording a batch checkpoints
it (this connection alone writes the staging; the settling thread checkpoints the rest)."""


class Staging:
    """The current run's rows entering the ledger. One thread uses it at a time (it has a
    connection of its own, beside the ones that record answers and settle them)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        run_id: int,
        target: str,
        paths: Sequence[str],
        carry_refused: bool,
    ) -> None:
        self._db = connect(state_dir, any_thread=True)
        self._db.execute(f"PRAGMA wal_autocheckpoint={_LOG_PAGES}")
        # 16 MiB of pages: the sourceUuid index, looked up and written at random by every
        # batch, stays in memory longer (SQLite's default is 2 MiB).
        self._db.execute("PRAGMA cache_size=-16384")
        self._dir = state_dir  # named by `writes` when a write fails
        self.run_id = run_id
        self.target = target
        self._paths = list(paths)
        self._carry_refused = carry_refused
        self._decided: Outcome | None = None  # the first message's failure (`first_sent`)
        self._keys: dict[tuple[str, str], int] = {}
        (last,) = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM msg").fetchone()
        self._next_id = int(last) + 1
        # Without earlier acceptances or refusals on this target, a batch is looked up among
        # this run's rows alone (what this run has accepted since, it recorded first),
        # but for the first message, sent alone before anything was recorded.
        history = self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM accepted WHERE target = ? AND run_id != ?) "
            "OR EXISTS (SELECT 1 FROM refused WHERE target = ? AND run_id != ?)",
            (target, run_id, target, run_id),
        ).fetchone()[0]
        self._lookup = _LOOKUP if history else _THIS_RUN
        self._own = dict(  # sourceUuid: run, of what the platform accepted from this run
            self._db.execute(
                "SELECT source_uuid, run_id FROM accepted WHERE target = ? AND run_id = ?",
                (target, run_id),
            ).fetchall()
        )
        self.rows = 0  # rows of the run in the ledger
        self._rejected_uuids = False  # whether a rejected row with a sourceUuid was recorded

    def close(self) -> None:
        self._db.close()

    def first_sent(self, outcome: Outcome) -> None:
        """The word on the first message, sent alone before it was recorded: recorded, it
        is this run's accepted or refused message, not sent again."""
        if outcome.state is State.ACCEPTED:
            self._own[outcome.source_uuid] = self.run_id
        elif outcome.state is State.FAILED:
            self._decided = outcome

    @writes
    def admit(self, rows: Sequence[Valid | Rejected]) -> list[tuple[int, Valid]]:
        """Record a batch of rows, in input order; the messages to send, with their ids."""
        uuids = [r.source_uuid for r in rows if r.source_uuid is not None]
        # Recorded and counted together, whichever way: an interruption (in a dry run,
        # which records in the thread that takes Ctrl-C) waits for the batch.
        with deferred():
            if self._lookup is _THIS_RUN and not _repeats_a_rejected_row(rows):
                # Nothing to look up but the rows read before. Unless the batch repeats a
                # rejected row (whose sourceUuid the unique index does not hold), the index
                # proves the batch's sourceUuids new as they are inserted; a batch it
                # refuses is taken back, and recorded again with what the lookup finds.
                found = self._found(uuids, _REJECTED if self._rejected_uuids else None)
                if not found.first:
                    with contextlib.suppress(_Repeated):
                        return self._record(rows, found, proved=True)
            return self._record(rows, self._found(uuids, self._lookup), proved=False)

    def _found(self, uuids: list[str], lookup: str | None) -> _Found:
        """What is known of these sourceUuids: what this run had accepted, and what
        `lookup` finds in the ledger (None: nothing to look up)."""
        found = _Found({})
        if self._own:
            found.accepted.update((u, self._own[u]) for u in uuids if u in self._own)
        if lookup is None:
            return found
        first = found.first
        for uuid, kind, a, b, errors in self._db.execute(
            lookup, {"uuids": orjson.dumps(uuids).decode(), "target": self.target}
        ):
            if kind == 0:
                first[uuid] = min(first.get(uuid, (a, b)), (a, b))
            elif kind == 1:
                found.accepted[uuid] = a
            else:
                found.refused[uuid] = (a, errors)
        return found

    def _record(
        self, rows: Sequence[Valid | Rejected], found: _Found, *, proved: bool
    ) -> list[tuple[int, Valid]]:
        """Record rows with what is known of their sourceUuids; `proved`: the unique index
        proves that no row before had them, or `_Repeated` is raised with nothing recorded."""
        first = found.first  # by sourceUuid, the earliest row with it
        accepted = found.accepted
        refused = found.refused
        keys: list[tuple[int, str, str]] = []
        pending: list[tuple[int, int, str, int, int]] = []  # to send
        decided: list[tuple[Any, ...]] = []  # with a state of their own
        rejected: list[tuple[Any, ...]] = []
        to_send: list[tuple[int, Valid]] = []
        next_id = self._next_id
        for row in rows:
            where = (row.source, row.line)
            if isinstance(row, Rejected):
                if row.source_uuid is not None and row.source_uuid not in first:
                    first[row.source_uuid] = where
                errors = orjson.dumps([p.as_error() for p in row.problems])
                rejected.append((*where, row.department, row.customer, row.source_uuid, errors))
                continue
            uuid = row.source_uuid
            earlier = first.get(uuid)
            if earlier is not None:
                rejected.append(
                    (*where, row.department, row.customer, uuid, self._repeat(row, earlier))
                )
                continue
            first[uuid] = where
            key = (row.department, row.customer)
            key_id = self._keys.get(key)
            if key_id is None:
                key_id = self._keys[key] = len(self._keys) + 1
                keys.append((key_id, *key))
            id_ = next_id
            next_id += 1
            state, status, retryable, errors_blob = State.PENDING, None, None, None
            first_sent = self._decided
            if uuid in accepted:
                state = State.ACCEPTED if accepted[uuid] == self.run_id else State.ALREADY_ACCEPTED
            elif first_sent is not None and first_sent.source_uuid == uuid:
                # The first message, sent alone: listed as its answer said, not sent again.
                state, status, retryable = (
                    State.FAILED,
                    first_sent.http_status,
                    first_sent.retryable,
                )
                errors_blob = orjson.dumps(first_sent.errors) if first_sent.errors else None
            elif self._carry_refused and uuid in refused:
                state, retryable = State.FAILED, False
                status, errors_blob = refused[uuid]
            else:
                to_send.append((id_, row))
                pending.append((id_, key_id, uuid, *where))
                continue
            decided.append((id_, key_id, uuid, *where, state, status, retryable, errors_blob))
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO keys VALUES (?, ?, ?)", keys)
                # The pending ones bind five values, not nine: a third less time a row.
                self._db.executemany(
                    "INSERT INTO msg(id, key_id, source_uuid, src, line) VALUES (?, ?, ?, ?, ?)",
                    pending,
                )
                self._db.executemany(
                    "INSERT INTO msg(id, key_id, source_uuid, src, line, state, http_status, "
                    "retryable, errors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    decided,
                )
                self._db.executemany(
                    "INSERT INTO rejected(src, line, department, customer, source_uuid, errors) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rejected,
                )
                self.rows += len(rows)
        except sqlite3.IntegrityError:
            if not proved:
                raise
            for _, department, customer in keys:  # taken back with the batch
                del self._keys[(department, customer)]
            raise _Repeated from None
        self._next_id = next_id
        if not self._rejected_uuids:
            self._rejected_uuids = any(r[4] is not None for r in rejected)
        return to_send

    def _repeat(self, row: Valid, earlier: tuple[int, int]) -> bytes:
        """The error of a row whose sourceUuid an earlier row has (the first one wins)."""
        src, line = earlier
        at = f"line {line}"
        if src != row.source:
            path = self._paths[src] if src < len(self._paths) else f"source {src}"
            at = f"{path}:{line}"
        description = f'sourceUuid: "{row.source_uuid}" was already read at {at}'
        return orjson.dumps(
            [{"errorCode": "DUPLICATE_SOURCE_UUID", "errorDescription": description}]
        )
