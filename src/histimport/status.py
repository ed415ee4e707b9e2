"""What a state ledger knows: its runs, their sources, counts per state, frequent errors.

Read without taking the run lock (read-only), so it works while an import is running.
"""

from __future__ import annotations

import fcntl
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from .chunking import clear_spill
from .errors import LedgerError, UsageError
from .ledger import (
    ACCEPTED_FROM,
    ACCEPTED_ROWS,
    JOURNAL_FILE,
    LATEST_ENTRIES,
    LEDGER_FILE,
    LOCK_FILE,
    OLD_BODIES_FILE,
    SQLITE_SUFFIXES,
    STAGING_FILE,
    has_table,
)
from .outputs import write_accepted, writing
from .records import State

_COUNTS = ("read", "rejected", "accepted", "failed", "notSent", "alreadyAccepted")
_STATE_NAMES = {
    State.PENDING: "pending",
    State.IN_FLIGHT: "inFlight",
    State.ACCEPTED: "accepted",
    State.FAILED: "failed",
    State.ALREADY_ACCEPTED: "alreadyAccepted",
}


def status(state_dir: Path, *, runs: int = 10) -> dict[str, Any]:
    """A summary of one state dir, as plain data."""
    with _open_ledger(state_dir) as (db, immutable):
        journal = state_dir / JOURNAL_FILE
        attached = journal.is_file()
        if attached:
            db.execute("ATTACH DATABASE ? AS jl", (_read_only(journal, immutable=immutable),))
        staging = state_dir / STAGING_FILE
        if staging.is_file():
            db.execute("ATTACH DATABASE ? AS st", (_read_only(staging, immutable=immutable),))
        return _summary(db, state_dir, runs, journal=attached and has_table(db, "jl", "journal"))


def _ledger_file(state_dir: Path) -> Path:
    """The ledger's file in `state_dir`; a UsageError when there is none."""
    path = state_dir / LEDGER_FILE
    if not path.is_file():
        raise UsageError(f"{state_dir}: no ledger here", hint="pass the --state-dir of a run")
    return path


@contextmanager
def _open_ledger(state_dir: Path) -> Iterator[tuple[sqlite3.Connection, bool]]:
    """The ledger of `state_dir`, read-only, and whether it is read as it stands
    (`immutable`): in a state dir that cannot be written (archived, mounted read-only),
    SQLite cannot make the files a shared read needs, and no import can be writing to it."""
    path = _ledger_file(state_dir)
    try:
        immutable = False
        db = sqlite3.connect(_read_only(path), uri=True)
        try:
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError as exc:
            db.close()
            if "readonly" not in str(exc):
                raise
            immutable = True
            db = sqlite3.connect(_read_only(path, immutable=True), uri=True)
        try:
            yield db, immutable
        finally:
            db.close()
    except OSError as exc:  # a directory that cannot be entered
        raise LedgerError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:
        raise LedgerError(f"{path}: cannot be read: {exc}") from exc


def _summary(
    db: sqlite3.Connection, state_dir: Path, runs: int, *, journal: bool
) -> dict[str, Any]:
    """`journal`: the journal is attached as `jl` and has its table."""
    if journal:
        # Each message's latest word in the journal, worked out once for what follows.
        db.execute(f"CREATE TEMP TABLE latest AS {LATEST_ENTRIES}")
    accepted = dict(db.execute("SELECT target, COUNT(*) FROM accepted GROUP BY target"))
    if journal and has_table(db, "main", "stage_meta"):
        # During a run, what the platform accepted since the last settling step is still in
        # the journal: counted too, so that the target's count and the run's agree.
        for target, n in db.execute(
            f"""SELECT s.target, COUNT(*) FROM temp.latest e, stage_meta s
                 WHERE e.state = {int(State.ACCEPTED)} AND e.seq > s.settled AND NOT EXISTS
                       (SELECT 1 FROM accepted a
                         WHERE a.target = s.target AND a.source_uuid = e.source_uuid)
                 GROUP BY 1"""
        ):
            if n:
                accepted[target] = accepted.get(target, 0) + n
    refused = dict(db.execute("SELECT target, COUNT(*) FROM refused GROUP BY target"))
    run_rows = db.execute(
        "SELECT id, command, target, started_at, finished_at, status, counts FROM runs "
        "ORDER BY id DESC LIMIT ?",
        (runs,),
    ).fetchall()
    run_list = []
    for rid, command, target, started, finished, state, counts in run_rows:
        sources = [
            {"path": p, "format": f, "size": size, "sha256": sha}
            for p, f, size, sha in db.execute(
                "SELECT path, format, size, sha256 FROM sources WHERE run_id = ? ORDER BY idx",
                (rid,),
            )
        ]
        report = orjson.loads(counts) if counts else {}
        run_list.append(
            {
                "id": rid,
                "command": command,
                "target": target,
                "startedAt": started,
                "finishedAt": finished,
                # A run that is neither finished nor running was killed.
                "status": state,
                "sources": sources,
                "counts": {
                    k: report[k]
                    for k in (
                        "read",
                        "rejected",
                        "accepted",
                        "failed",
                        "notSent",
                        "alreadyAccepted",
                    )
                    if k in report
                },
            }
        )
        if "carriedOver" in report:  # retry: entries of its failed files listed again
            run_list[-1]["carriedOver"] = sum(report["carriedOver"].values())
    current: dict[str, int] = {}
    errors: Counter[str] = Counter()
    staged = has_table(db, "main", "msg") or (
        any(name == "st" for _, name, _ in db.execute("PRAGMA database_list"))
        and has_table(db, "st", "msg")
    )
    if staged:
        # During a run, the latest word on a message may still be in the journal.
        entries = "temp.latest" if journal else "(SELECT NULL AS msg_id, NULL AS state)"
        for state, n in db.execute(
            f"""SELECT COALESCE(j.state, o.state, m.state), COUNT(*) FROM msg m
               LEFT JOIN {entries} j ON j.msg_id = m.id
               LEFT JOIN outcome o ON o.msg_id = m.id
               GROUP BY 1"""
        ):
            current[_STATE_NAMES[State(state)]] = n
        flying = _in_flight(db) if journal else 0
        if flying:
            current["pending"] = current.get("pending", 0) - flying
            current["inFlight"] = flying
        (current["rejected"],) = db.execute("SELECT COUNT(*) FROM rejected").fetchone()
        for (blob,) in db.execute(
            "SELECT errors FROM msg WHERE errors IS NOT NULL UNION ALL "
            f"SELECT errors FROM outcome WHERE errors IS NOT NULL AND state = {int(State.FAILED)} "
            "UNION ALL "
            "SELECT errors FROM rejected"
        ):
            for error in orjson.loads(blob):
                errors[str(error.get("errorCode"))] += 1
    if not current and run_list and run_list[0]["counts"]:
        # A run that had everything accepted leaves no staging behind: its report counts.
        last = run_list[0]["counts"]
        current = {
            k: last[k]
            for k in ("accepted", "failed", "notSent", "alreadyAccepted", "rejected")
            if k in last and (last[k] or k == "rejected")
        }
    return {
        "stateDir": str(state_dir),
        "acceptedByTarget": accepted,
        "refusedByTarget": refused,
        "lastRun": current,
        "errorCodes": dict(errors.most_common(10)),
        "runs": run_list,
    }


def _in_flight(db: sqlite3.Connection) -> int:
    """Pending messages sent in a request that has no answer yet: each request leaves a
    journal row with its messages' ids, and its answer a row listing the same messages
    (`temp.latest`: each message's latest word, made by `_summary`)."""
    latest = dict(db.execute("SELECT msg_id, seq FROM temp.latest"))
    flying: set[int] = set()
    in_flight = "SELECT seq, items FROM jl.journal WHERE state = ?"
    for seq, items in db.execute(in_flight, (State.IN_FLIGHT,)):
        flying.update(i for i in orjson.loads(items) if latest.get(i, -1) < seq)
    return len(flying)


def export_accepted(state_dirs: list[Path], path: Path) -> int:
    """Write what the ledgers of `state_dirs` know as accepted to `path` (as `--accepted-out`
    does, with each message's target last); the number of messages."""
    for state_dir in state_dirs:
        _ledger_file(state_dir)  # before the output's folder is made
    with writing(path, "--accepted"):
        return write_accepted(path, _accepted_rows(state_dirs), extra=("target",))


def _accepted_rows(state_dirs: list[Path]) -> Iterator[tuple[str | None, ...]]:
    for state_dir in state_dirs:
        with _open_ledger(state_dir) as (db, _):
            if has_table(db, "main", "customers"):  # written by a version that keeps them
                yield from db.execute(f"{ACCEPTED_ROWS}, a.target {ACCEPTED_FROM}")
            else:
                yield from db.execute(
                    "SELECT source_uuid, message_uuid, NULL, NULL, target FROM accepted"
                )


def _read_only(path: Path, *, immutable: bool = False) -> str:
    """A SQLite URI opening `path` read-only (quoted: a name may hold `#`, `?` or `%`)."""
    return f"{path.absolute().as_uri()}?mode=ro" + ("&immutable=1" if immutable else "")


def purge(state_dir: Path, *, force: bool = False) -> bool:
    """Delete a state dir once its import is finished (it holds message content): the files
    histimport made in it, then the directory if nothing else is left in it. False when
    other files keep the directory (a state dir may have been named in a project's own)."""
    summary = status(state_dir, runs=1)
    last = summary["runs"][0] if summary["runs"] else None
    if not force and (last is None or last["status"] != "ok"):
        raise UsageError(
            f"{state_dir}: the last run did not finish with everything accepted",
            hint="finish the import (or check failed.json), or pass --force to delete anyway",
        )
    directory = state_dir.resolve()  # a symlink's directory; "." by its name
    try:
        with open(directory / LOCK_FILE, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise LedgerError(f"{state_dir} is in use by a running import") from exc
            for name in _MADE:
                (directory / name).unlink(missing_ok=True)
            clear_spill(directory)
            # Still locked: a run starting now finds no lock file to share with this one.
            (directory / LOCK_FILE).unlink()
        if any(directory.iterdir()):
            return False
        directory.rmdir()
    except OSError as exc:
        raise LedgerError(f"{state_dir}: cannot delete: {exc.strerror or exc}") from exc
    if state_dir.is_symlink():
        state_dir.unlink()
    return True


_MADE = [
    f"{name}{suffix}"
    for name in (LEDGER_FILE, JOURNAL_FILE, STAGING_FILE)
    for suffix in SQLITE_SUFFIXES
] + [OLD_BODIES_FILE]
"""The files of a state dir, but for its lock file."""
