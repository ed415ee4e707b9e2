"""Recording: the run ledger, a SQLite database in the state dir. It keeps ids and states,
never a message's content.

It holds two things. `accepted` and `refused` are durable across runs: every message the
platform accepted or refused, per target (base URL) — the basis of de-duplication and
resume. The staging tables (`msg`, `rejected`, `keys`) hold the current run: a row per
message read, with its location, its (department, customer) and its state, and a row per
rejected row, so that every row is accounted for exactly (`staging` writes them, as rows
are read).

While sending, every answer is committed as it arrives, as rows appended to `journal`, one
per request and kind of outcome with its messages as a JSON list: appending touches a page or
two per request, where updating the staged messages in place would rewrite their pages
as answers come. The journal is a database of its own (`journal.sqlite3`, attached as
`jl`), so that a thread can settle it into the ledger while answers keep arriving, neither
waiting for the other's write lock.

Settling applies the journal in steps, in journal order, up to a watermark kept with what
it wrote (`stage_meta.settled`): during sending, in that thread (SQLite runs without the
GIL), and for what is left at the end of a run; after a crash, the next run applies the dead
run's journal before it starts, so nothing the platform answered is ever forgotten.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson

from .chunking import clear_spill
from .errors import LedgerError
from .logs import timestamp
from .read import UNREADABLE
from .records import Failure, Outcome, Pending, State

LEDGER_FILE = "ledger.sqlite3"
JOURNAL_FILE = "journal.sqlite3"
STAGING_FILE = "staging.sqlite3"
SCRATCH = (JOURNAL_FILE, STAGING_FILE)
"""The databases of one run (attached as `jl` and `st`): replaced by the next run, deleted
once a run had everything accepted."""
_SCHEMAS = {"main": LEDGER_FILE, "jl": JOURNAL_FILE, "st": STAGING_FILE}
LOCK_FILE = "lock"
OLD_BODIES_FILE = "staged-bodies"
"""Where earlier versions staged message bodies: deleted when a run begins."""


# The SQL below spells the states as numbers, from the enum.
_PENDING, _ACCEPTED, _FAILED, _IN_FLIGHT = (
    int(State.PENDING),
    int(State.ACCEPTED),
    int(State.FAILED),
    int(State.IN_FLIGHT),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY, command TEXT, target TEXT, started_at TEXT, finished_at TEXT,
    status TEXT, counts TEXT);
CREATE TABLE IF NOT EXISTS sources(
    run_id INTEGER, idx INTEGER, path TEXT, format TEXT, size INTEGER, sha256 TEXT,
    realpath TEXT);
CREATE TABLE IF NOT EXISTS refused(
    target TEXT, source_uuid TEXT, http_status INTEGER, errors BLOB, run_id INTEGER,
    PRIMARY KEY (target, source_uuid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accepted(
    target TEXT, source_uuid TEXT, message_uuid TEXT, run_id INTEGER, at TEXT,
    PRIMARY KEY (target, source_uuid)) WITHOUT ROWID;
"""

_MIGRATIONS: tuple[str, ...] = (
    # 1: what outlives a run: the runs, their sources, what the platform accepted and
    #    refused. "IF NOT EXISTS": a state dir from before the schema had versions takes it
    #    as it stands.
    _SCHEMA,
    # 2: whose message each acceptance was (department and customer, a small id each):
    #    `status --accepted` hands the map of old ids to new ones over whole. Rows accepted
    #    before have none.
    """CREATE TABLE customers(
           id INTEGER PRIMARY KEY, department TEXT, customer TEXT, UNIQUE(department, customer));
       ALTER TABLE accepted ADD COLUMN customer_id INTEGER;""",
)
"""The ledger's schema, one numbered step at a time: the step a state dir is at is its
`PRAGMA user_version`. (The staging tables are made anew by every run, in `_STAGING`.)"""
SCHEMA_VERSION = len(_MIGRATIONS)
_JOURNAL_TABLE = """CREATE TABLE IF NOT EXISTS jl.journal(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, state INTEGER, http_status INTEGER,
    retryable INTEGER, errors BLOB, items BLOB, department TEXT, customer TEXT)"""
"""One row per request in flight and per kind of outcome of an answer (AUTOINCREMENT: a
sequence number is never given twice, even after the journal is emptied)."""
_LEGACY_STAGING = """
DROP TABLE IF EXISTS main.msg;
DROP TABLE IF EXISTS main.rejected;
DROP TABLE IF EXISTS main.keys;
DROP TABLE IF EXISTS main.outcome;
DROP TABLE IF EXISTS main.journal;
"""
"""Where state dirs of earlier versions kept a run's staging: in the ledger itself."""
_STAGING = f"""
{_JOURNAL_TABLE};
DROP TABLE IF EXISTS main.stage_meta;
CREATE TABLE main.stage_meta(run_id INTEGER, target TEXT, settled INTEGER NOT NULL DEFAULT 0);
DROP TABLE IF EXISTS main.outcome;
CREATE TABLE main.outcome(
    msg_id INTEGER PRIMARY KEY, state INTEGER, http_status INTEGER, retryable INTEGER,
    errors BLOB);
CREATE TABLE st.keys(id INTEGER PRIMARY KEY, department TEXT, customer TEXT);
CREATE TABLE st.msg(
    id INTEGER PRIMARY KEY, key_id INTEGER, source_uuid TEXT, src INTEGER, line INTEGER,
    state INTEGER DEFAULT 0, http_status INTEGER, retryable INTEGER, errors BLOB);
CREATE UNIQUE INDEX st.msg_uuid ON msg(source_uuid);
CREATE TABLE st.rejected(
    id INTEGER PRIMARY KEY, src INTEGER, line INTEGER, department TEXT, customer TEXT,
    source_uuid TEXT, errors BLOB);
CREATE INDEX st.rejected_uuid ON rejected(source_uuid) WHERE source_uuid IS NOT NULL;
"""
"""A run's staging, made anew by each run: its rows in a file of their own, written by the
thread that reads; what settling writes beside the ledger, in one transaction with it: the
watermark of the settled journal, and each message's last word (`outcome`: ids and states,
no message content)."""


def _entries(extra: str = "") -> str:
    return f"""
    SELECT json_extract(e.value, '$[0]') AS msg_id, json_extract(e.value, '$[1]') AS source_uuid,
           j.state, j.http_status, j.retryable, j.errors,
           json_extract(e.value, '$[2]') AS message_uuid, j.seq{extra}
      FROM jl.journal j, json_each(j.items) e WHERE j.state != {_IN_FLIGHT}"""


_ENTRIES = _entries()
"""Every word on a message in the journal, one row each; in-flight marks are left out.
(Without the department and customer, which a journal written by an earlier version lacks:
`status` reads such a journal as it stands.)"""
_STEP_ENTRIES = _entries(", j.department, j.customer")
"""The same, with whose messages they are (the settling keeps it with what was accepted)."""
ACCEPTED_ROWS = "SELECT a.source_uuid, a.message_uuid, c.department, c.customer"
ACCEPTED_FROM = "FROM accepted a LEFT JOIN customers c ON c.id = a.customer_id"
"""What the platform accepted, with whose messages they are: `status --accepted` and
`--accepted-out` read it so."""
LATEST_ENTRIES = f"SELECT *, MAX(seq) FROM ({_ENTRIES}) GROUP BY msg_id"
"""Each message's last word (SQLite takes the other columns from the row of MAX(seq))."""


SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
"""The files of one SQLite database: itself, its write-ahead log and index, its journal."""


_Method = TypeVar("_Method", bound=Callable[..., Any])


def writes(method: _Method) -> _Method:
    """A write the ledger cannot make (a full disk, a file removed under it) stops the run
    with a clear error, not a traceback; the next run resumes from what was committed."""

    @functools.wraps(method)
    def guarded(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(
                f"state dir {self._dir}: cannot write: {exc}",
                hint="free some disk space (or fix the state dir) and run the same command "
                "again: it resumes from what was committed",
            ) from exc

    return cast(_Method, guarded)


def connect(state_dir: Path, *, any_thread: bool = False) -> sqlite3.Connection:
    """A connection to the ledger with the journal attached as `jl` and the run's staging
    as `st`. (Absolute paths: a SQLite built to take URIs everywhere would read a name
    starting `file:` as one.) `any_thread`: made in one thread, used in another (by one at
    a time)."""
    db = sqlite3.connect(
        str((state_dir / LEDGER_FILE).absolute()),
        isolation_level=None,
        check_same_thread=not any_thread,
    )
    _configure(db, "main")
    for schema in ("jl", "st"):
        _attach(db, state_dir, schema)
    db.execute("PRAGMA busy_timeout=30000")
    return db


def _attach(db: sqlite3.Connection, state_dir: Path, schema: str) -> None:
    path = state_dir / _SCHEMAS[schema]
    old_umask = os.umask(0o077)  # a file made here is private
    try:
        db.execute(f"ATTACH DATABASE ? AS {schema}", (str(path.absolute()),))
        _configure(db, schema)
    finally:
        os.umask(old_umask)


def _configure(db: sqlite3.Connection, schema: str) -> None:
    # Pages freed go back to the file system (a new file only: the setting takes before
    # the first table, or with a VACUUM).
    db.execute(f"PRAGMA {schema}.auto_vacuum=INCREMENTAL")
    db.execute(f"PRAGMA {schema}.journal_mode=WAL")
    db.execute(f"PRAGMA {schema}.synchronous=NORMAL")
    # A log that grew (a burst of writes) is cut back once checkpointed.
    db.execute(f"PRAGMA {schema}.journal_size_limit={_LOG_BYTES}")


_STEP_ROWS = 300
"""Journal rows (requests' answers) settled in one transaction at most: a step's writes,
scattered over the ledger, go through its log, which is cut back between two steps. A step
costs by the pages it writes, which the accepted ids' random keys spread over the whole
ledger whatever its rows: steps a second apart, of up to 300 rows, cost a third of steps
of 100 rows back to back (bench/README.md), and keep the log within the export's size."""
_LOG_BYTES = 16 << 20
"""A write-ahead log is truncated to this size when a checkpoint starts it over."""
_LOG_PAGES = 2_500
"""Pages (10 MB) of a write-ahead log (the ledger's, the journal's) past which the settling
thread has the log start over."""
_JOURNAL_LOG_BOUND = 25_000
"""Pages (100 MB) past which appending an answer checkpoints the log itself: only when the
settling thread no longer does."""

_STEP = (
    # In journal order (the step's rows were written in it), each word replacing the one
    # before: the last word stays.
    """INSERT OR REPLACE INTO outcome
       SELECT msg_id, state, http_status, retryable, errors FROM temp.step ORDER BY rowid""",
    # Sorted, so that the B-tree grows page by page instead of at random. The staged
    # messages are not read: the journal entries carry their sourceUuids.
    f"""INSERT OR IGNORE INTO customers(department, customer)
       SELECT DISTINCT department, customer FROM temp.step
        WHERE state = {_ACCEPTED} AND customer IS NOT NULL""",
    f"""INSERT OR IGNORE INTO accepted(target, source_uuid, message_uuid, run_id, at, customer_id)
       SELECT :target, s.source_uuid, s.message_uuid, :run, :at, c.id
         FROM temp.step s LEFT JOIN customers c
              ON c.department = s.department AND c.customer = s.customer
        WHERE s.state = {_ACCEPTED} ORDER BY s.source_uuid""",
    # A refusal never undoes an acceptance (a message is in one of the two, at most).
    f"""INSERT OR REPLACE INTO refused
       SELECT :target, source_uuid, http_status, errors, :run
         FROM temp.step s WHERE state = {_FAILED} AND retryable = 0 AND NOT EXISTS
              (SELECT 1 FROM accepted a WHERE a.target = :target AND a.source_uuid = s.source_uuid)
        ORDER BY source_uuid""",
    "UPDATE stage_meta SET settled = :upto",
)
_UNREFUSE = f"""DELETE FROM refused WHERE target = :target AND source_uuid IN
                 (SELECT source_uuid FROM temp.step WHERE state = {_ACCEPTED})"""
"""What the platform accepted is no longer refused, whenever it was refused."""


def _settle_step(db: sqlite3.Connection, target: str, run_id: int) -> bool:
    """Apply the journal past the watermark in one transaction, the watermark with it, up
    to _STEP_ROWS of its rows; whether rows are left. Only the ledger is written (the
    journal is read), so this runs beside a connection appending to the journal."""
    with db:
        db.execute("BEGIN")
        (settled,) = db.execute("SELECT settled FROM stage_meta").fetchone()
        (upto,) = db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM (SELECT seq FROM jl.journal WHERE seq > ? "
            "ORDER BY seq LIMIT ?)",
            (settled, _STEP_ROWS),
        ).fetchone()
        if upto <= settled:
            return False
        params = {"target": target, "run": run_id, "at": timestamp(), "upto": upto}
        db.execute(
            f"CREATE TEMP TABLE step AS {_STEP_ENTRIES} AND j.seq > :after AND j.seq <= :upto "
            "ORDER BY j.seq",
            {"after": settled, "upto": upto},
        )
        for statement in _STEP:
            db.execute(statement, params)
        refused = db.execute("SELECT 1 FROM refused WHERE target = ? LIMIT 1", (target,))
        if refused.fetchone() is not None:
            # Only then: gathering the step's sourceUuids takes a tenth of the step.
            db.execute(_UNREFUSE, params)
        db.execute("DROP TABLE temp.step")
    left = db.execute("SELECT 1 FROM jl.journal WHERE seq > ? LIMIT 1", (upto,)).fetchone()
    return left is not None


def _cut_logs(db: sqlite3.Connection, state_dir: Path) -> None:
    """Checkpoint the ledger's and the journal's logs once grown past _LOG_PAGES, and have
    them start over, empty: this waits for the write under way, and holds the next one
    back meanwhile. (Checkpointed less often, a page written by several steps is copied
    into the database once.)"""
    for schema in ("main", "jl"):
        log = state_dir / f"{_SCHEMAS[schema]}-wal"
        with contextlib.suppress(OSError):
            if log.stat().st_size > _LOG_PAGES * 4096:
                db.execute(f"PRAGMA {schema}.wal_checkpoint(TRUNCATE)").fetchall()


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the ledger's schema to SCHEMA_VERSION, each step in a transaction of its own."""
    (version,) = db.execute("PRAGMA main.user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"state ledger {path} was written by a newer histimport (schema {version}; this "
            f"one knows {SCHEMA_VERSION})",
            hint="run the histimport that wrote it, or a newer one",
        )
    for number, step in enumerate(_MIGRATIONS[version:], version + 1):
        db.executescript(f"BEGIN;\n{step}\nPRAGMA main.user_version = {number};\nCOMMIT;")


def _add_missing(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Add to `table` (schema.name) the columns it lacks (written by a version before
    them), each with its declaration."""
    schema, name = table.split(".")
    have = {row[1] for row in db.execute(f"PRAGMA {schema}.table_info({name})")}
    for column, declaration in columns.items():
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def has_table(db: sqlite3.Connection, schema: str, name: str) -> bool:
    """Whether the database `schema` of `db` (main, or an attached one) has table `name`."""
    found = db.execute(f"SELECT 1 FROM {schema}.sqlite_master WHERE name = ?", (name,))
    return found.fetchone() is not None


class Ledger:
    """One state dir, used by one run at a time (a lock file guards it)."""

    def __init__(self, state_dir: Path) -> None:
        try:
            if not state_dir.is_dir():
                # Only a directory made here is made private: one named that exists (a
                # project's own, say) keeps its mode; the files in it are private anyway.
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(state_dir, 0o700)
            self._lock = open(state_dir / LOCK_FILE, "a")  # noqa: SIM115
            os.chmod(state_dir / LOCK_FILE, 0o600)
        except OSError as exc:
            raise LedgerError(
                f"state dir {state_dir}: {exc.strerror or exc}", hint="pass a writable --state-dir"
            ) from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            raise LedgerError(
                f"state dir {state_dir} is in use by another histimport run",
                hint="wait for it to finish, or pass another --state-dir",
            ) from exc
        try:
            current = os.path.samestat(
                os.fstat(self._lock.fileno()), os.stat(state_dir / LOCK_FILE)
            )
        except OSError:
            current = False
        if not current:  # `status --purge` unlinked it between the open and the lock
            self._lock.close()
            raise LedgerError(
                f"state dir {state_dir} was being deleted as this run began",
                hint="run the same command again",
            )
        path = state_dir / LEDGER_FILE
        old_umask = os.umask(0o077)
        try:
            self._db = connect(state_dir)
            _migrate(self._db, path)
        except LedgerError:
            self._db.close()
            self._lock.close()
            raise
        except sqlite3.Error as exc:
            self._lock.close()
            raise LedgerError(
                f"state ledger {path} is unusable: {exc}",
                hint=f"move {state_dir} aside (it records what was accepted) and run again, "
                "or pass another --state-dir",
            ) from exc
        finally:
            os.umask(old_umask)
        self.run_id = 0
        self.target = ""
        self._dir = state_dir

    def close(self) -> None:
        self._db.close()
        self._lock.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- run ---------------------------------------------------------------------------

    @writes
    def begin_run(self, command: str, target: str) -> None:
        """Start a run: a fresh staging area; what was accepted or refused before stays."""
        self._recover()
        self.target = target
        db = self._db
        if any(has_table(db, "main", name) for name in ("msg", "journal")):
            db.executescript(_LEGACY_STAGING)
            db.executescript("PRAGMA main.incremental_vacuum;")
        self._replace(*SCRATCH)
        db.executescript(_STAGING)
        clear_spill(self._dir)
        (self._dir / OLD_BODIES_FILE).unlink(missing_ok=True)
        cur = db.execute(
            "INSERT INTO runs(command, target, started_at, status) VALUES (?, ?, ?, 'running')",
            (command, target, timestamp()),
        )
        self.run_id = int(cur.lastrowid or 0)
        db.execute("INSERT INTO stage_meta(run_id, target) VALUES (?, ?)", (self.run_id, target))

    def _replace(self, *names: str, attach: bool = True) -> None:
        """Delete a run's databases (journal, staging) and, `attach`, start them anew:
        deleted, nothing of them is left, not even in free pages."""
        schemas = {file: schema for schema, file in _SCHEMAS.items()}
        for name in names:
            schema = schemas[name]
            self._db.execute(f"DETACH DATABASE {schema}")
            for suffix in SQLITE_SUFFIXES:
                (self._dir / f"{name}{suffix}").unlink(missing_ok=True)
            if attach:
                _attach(self._db, self._dir, schema)

    def _recover(self) -> None:
        """Apply the journal a killed run left behind, before its staging is replaced."""
        db = self._db
        if not has_table(db, "main", "stage_meta"):
            return
        if has_table(db, "main", "journal"):
            # A state dir of a version that kept the journal in the ledger: move it over.
            with db:
                db.execute("BEGIN")
                db.execute(_JOURNAL_TABLE)
                db.execute(
                    "INSERT INTO jl.journal(state, http_status, retryable, errors, items) "
                    "SELECT state, http_status, retryable, errors, items FROM main.journal "
                    "ORDER BY seq"
                )
                db.execute("DROP TABLE main.journal")
        _add_missing(db, "main.stage_meta", {"settled": "INTEGER NOT NULL DEFAULT 0"})
        row = db.execute("SELECT run_id, target FROM stage_meta").fetchone()
        if row is not None and has_table(db, "jl", "journal"):
            _add_missing(db, "jl.journal", {"department": "TEXT", "customer": "TEXT"})
            self.run_id, self.target = row
            self.settle()

    def finish_run(self, status: str, counts: dict[str, Any]) -> None:
        """The run's end. What waited to be sent goes: the state dir keeps ids, not
        customers' messages, once a run is over (a later run reads the sources again)."""
        self._db.execute(
            "UPDATE runs SET finished_at=?, status=?, counts=? WHERE id=?",
            (timestamp(), status, orjson.dumps(counts).decode(), self.run_id),
        )
        clear_spill(self._dir)
        if status == "ok":
            # Everything read was accepted: its staging and journal have nothing left to
            # list or send; the ledger keeps what later runs need, the accepted ids.
            self._replace(*SCRATCH, attach=False)
            self._db.execute("DROP TABLE IF EXISTS main.stage_meta")
            # Its pages (ids and states) are left free for the next run: moving the rest
            # into them would write most of the ledger again.
            self._db.execute("DROP TABLE IF EXISTS main.outcome")
            self._db.execute("PRAGMA main.wal_checkpoint(TRUNCATE)").fetchall()

    def read_before(self, realpaths: Iterable[str | None]) -> bool:
        """Whether an earlier run on this target read one of these files whole (a resumed
        run: until it has read them whole, it cannot tell whether they changed)."""
        return any(
            self._db.execute(
                "SELECT 1 FROM sources s JOIN runs r ON r.id = s.run_id "
                "WHERE s.realpath = ? AND r.target = ? AND r.id < ? LIMIT 1",
                (realpath, self.target, self.run_id),
            ).fetchone()
            for realpath in realpaths
            if realpath is not None
        )

    def changed_sources(self, sources: Iterable[tuple[str, str | None, str]]) -> list[str]:
        """Of (path, realpath, sha256), the paths whose content differs from what the last
        run on this target read at the same place."""
        changed = []
        for path, realpath, sha256 in sources:
            row = self._db.execute(
                "SELECT s.sha256 FROM sources s JOIN runs r ON r.id = s.run_id "
                "WHERE s.realpath = ? AND r.target = ? AND r.id < ? AND r.command = 'load' "
                "ORDER BY r.id DESC LIMIT 1",
                (realpath, self.target, self.run_id),
            ).fetchone()
            if row is not None and row[0] != sha256:
                changed.append(path)
        return changed

    @writes
    def record_sources(self, sources: Iterable[tuple[int, str, str, int, str, str | None]]) -> None:
        self._db.executemany(
            "INSERT INTO sources(run_id, idx, path, format, size, sha256, realpath) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((self.run_id, *source) for source in sources),
        )

    def known(self, source_uuid: str, *, refused_too: bool) -> bool:
        """Whether the platform accepted this message before (or, `refused_too`, refused
        it for good): a run does not send it again."""
        tables = ("accepted", "refused") if refused_too else ("accepted",)
        return any(
            self._db.execute(
                f"SELECT 1 FROM {table} WHERE target = ? AND source_uuid = ?",
                (self.target, source_uuid),
            ).fetchone()
            for table in tables
        )

    @writes
    def remember(self, outcome: Outcome, department: str, customer: str) -> None:
        """The platform's word on a message sent before staging (the run's first, alone):
        staged later, it is this run's accepted or refused message, not sent again."""
        if outcome.state is State.ACCEPTED:
            self._db.execute(
                "INSERT OR IGNORE INTO customers(department, customer) VALUES (?, ?)",
                (department, customer),
            )
            self._db.execute(
                "INSERT OR IGNORE INTO accepted(target, source_uuid, message_uuid, run_id, at, "
                "customer_id) SELECT ?, ?, ?, ?, ?, id FROM customers "
                "WHERE department = ? AND customer = ?",
                (
                    self.target,
                    outcome.source_uuid,
                    outcome.message_uuid,
                    self.run_id,
                    timestamp(),
                    department,
                    customer,
                ),
            )
            self._db.execute(
                "DELETE FROM refused WHERE target = ? AND source_uuid = ?",
                (self.target, outcome.source_uuid),
            )
        elif outcome.state is State.FAILED and not outcome.retryable:
            self._db.execute(
                "INSERT OR REPLACE INTO refused VALUES (?, ?, ?, ?, ?)",
                (
                    self.target,
                    outcome.source_uuid,
                    outcome.http_status,
                    orjson.dumps(outcome.errors) if outcome.errors else None,
                    self.run_id,
                ),
            )

    @writes
    def describe_unsent(self, errors: tuple[dict[str, Any], ...]) -> None:
        """Give the messages no request carried these errors (why they were not sent), once
        sending is over and settled: the failed file lists them so, retryable."""
        self._db.execute(
            "UPDATE msg SET errors = ?, retryable = 1 WHERE state IN (?, ?) AND errors IS NULL "
            "AND id NOT IN (SELECT msg_id FROM outcome)",
            (orjson.dumps(errors), State.PENDING, State.IN_FLIGHT),
        )

    @writes
    def forget_refusals(self) -> None:
        """--fresh: the platform's earlier refusals are not carried into this run."""
        self._db.execute("DELETE FROM refused WHERE target = ?", (self.target,))

    # -- staging -----------------------------------------------------------------------

    @writes
    def staged_among(
        self, uuids: Iterable[str], lines: Iterable[tuple[int, int, str | None]]
    ) -> tuple[set[str], dict[tuple[int, int], str | None]]:
        """Which of these sourceUuids this run staged, as messages or as rejected rows; and
        of these (source, line) pairs, those it staged a row at, with that row's sourceUuid,
        unless the row is a message the platform accepted before the line's third item
        (when the failed file that lists the line was written, if known): such a row is
        another one than the row listed there, moved to it (a line above was deleted)."""
        db = self._db
        db.execute("CREATE TEMP TABLE want_uuid(u TEXT PRIMARY KEY) WITHOUT ROWID")
        db.execute(
            "CREATE TEMP TABLE want_line(src INTEGER, line INTEGER, since TEXT, "
            "PRIMARY KEY (src, line)) WITHOUT ROWID"
        )
        try:
            db.executemany("INSERT OR IGNORE INTO want_uuid VALUES (?)", ((u,) for u in uuids))
            db.executemany("INSERT OR IGNORE INTO want_line VALUES (?, ?, ?)", lines)
            met_uuids = {
                str(u)
                for (u,) in db.execute(
                    "SELECT u FROM want_uuid WHERE u IN (SELECT source_uuid FROM msg) "
                    "OR u IN (SELECT source_uuid FROM rejected WHERE source_uuid IS NOT NULL)"
                )
            }
            met_lines = {
                (int(src), int(line)): uuid
                # One pass over each table, each row looked up among the wanted ones.
                for src, line, uuid in db.execute(
                    "SELECT w.src, w.line, m.source_uuid FROM msg m CROSS JOIN want_line w "
                    "ON w.src = m.src AND w.line = m.line "
                    "WHERE m.state != ? OR w.since IS NULL OR EXISTS (SELECT 1 FROM accepted a "
                    "WHERE a.target = ? AND a.source_uuid = m.source_uuid AND a.at > w.since) "
                    "UNION ALL SELECT w.src, w.line, r.source_uuid FROM rejected r "
                    "CROSS JOIN want_line w ON w.src = r.src AND w.line = r.line",
                    (State.ALREADY_ACCEPTED, self.target),
                )
            }
        finally:
            db.execute("DROP TABLE temp.want_uuid")
            db.execute("DROP TABLE temp.want_line")
        return met_uuids, met_lines

    def broken_lines(self) -> set[tuple[int, int]]:
        """(source, line) of the rows standing for a source that breaks off there."""
        return {
            (int(src), int(line))
            for src, line in self._db.execute(
                "SELECT src, line FROM rejected WHERE source_uuid IS NULL "
                "AND json_extract(errors, '$[0].errorCode') = ?",
                (UNREADABLE,),
            )
        }

    def last_lines(self) -> dict[int, int]:
        """The last line staged of each source, by index."""
        return {
            int(src): int(line)
            for src, line in self._db.execute(
                "SELECT src, MAX(line) FROM (SELECT src, line FROM msg "
                "UNION ALL SELECT src, line FROM rejected) GROUP BY src"
            )
        }

    def staged_rows(self) -> int:
        """Rows of this run in the ledger, whatever became of them."""
        (n,) = self._db.execute(
            "SELECT (SELECT COUNT(*) FROM msg) + (SELECT COUNT(*) FROM rejected)"
        ).fetchone()
        return int(n)

    # -- sending -----------------------------------------------------------------------

    @writes
    def mark_in_flight(self, messages: Iterable[Pending]) -> int:
        """A request is about to leave: one journal row lists its messages' ids, for `status`
        to tell; settling passes over it (with no later word, a message is pending). Its
        sequence number, for `prune_journal`."""
        cursor = self._db.execute(
            "INSERT INTO jl.journal(state, items) VALUES (?, ?)",
            (State.IN_FLIGHT, orjson.dumps([m.id for m in messages])),
        )
        return int(cursor.lastrowid or 0)

    @writes
    def prune_journal(self, oldest_in_flight: int | None) -> None:
        """Drop the journal rows that were settled, and the marks of requests no longer in
        flight (all those before `oldest_in_flight`, the mark of the oldest request still
        in flight; None: none is): the journal holds what is still to settle, not a run's
        every answer."""
        (settled,) = self._db.execute("SELECT settled FROM stage_meta").fetchone()
        self._db.execute(
            "DELETE FROM jl.journal WHERE seq <= ? AND (state != ? OR seq < ?)",
            (
                settled,
                State.IN_FLIGHT,
                settled + 1 if oldest_in_flight is None else oldest_in_flight,
            ),
        )

    @writes
    def record(self, outcomes: list[Outcome], key: tuple[str, str] | None = None) -> None:
        """Commit the outcomes of one request before anything relies on it: a row per run of
        outcomes alike, its messages as [[id, sourceUuid, messageUuid], ...], and whose
        messages they are (`key`, department and customer: kept with what was accepted)."""
        department, customer = key if key is not None else (None, None)
        rows = []
        items: list[list[Any]] = []
        previous = None
        for o in outcomes:
            kind = (o.state, o.http_status, o.retryable, o.errors)
            if kind != previous:
                items = []
                rows.append((*kind, items))
                previous = kind
            items.append([o.id, o.source_uuid, o.message_uuid])
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO jl.journal(state, http_status, retryable, errors, items, "
                "department, customer) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        state,
                        status,
                        int(retryable),
                        orjson.dumps(errors) if errors else None,
                        orjson.dumps(items),
                        department,
                        customer,
                    )
                    for state, status, retryable, errors, items in rows
                ],
            )

    @writes
    def settle(self) -> None:
        """Apply what is left of the journal: each message's last word goes into `outcome`,
        and what the platform accepted or refused is kept for later runs. Idempotent.
        In-flight marks are left out: a message with no later word is still pending, that
        is, not sent. The journal, all applied, is then emptied (its sequence goes on).
        Nothing may append to the journal meanwhile: the settling thread is stopped."""
        while _settle_step(self._db, self.target, self.run_id):
            _cut_logs(self._db, self._dir)
        self._db.execute("DELETE FROM jl.journal")  # whole: SQLite drops its pages at once
        _cut_logs(self._db, self._dir)

    @contextmanager
    def settling(self, every: float = 1.0) -> Iterator[None]:
        """Settle the journal in steps, in a thread, while the body runs (sending): a step
        every `every` seconds, every quarter of it while behind; the end of the run has the
        last steps left. The body may append to the journal; it must not write anything
        else to the ledger meanwhile."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self._settle_until, args=(stop, every), name="histimport-settle", daemon=True
        )
        # The thread checkpoints the journal's write-ahead log after each step, off the
        # event loop; appending answers checkpoints it only if the thread does not.
        self._db.execute(f"PRAGMA wal_autocheckpoint={_JOURNAL_LOG_BOUND}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self._db.execute("PRAGMA wal_autocheckpoint=1000")

    def _settle_until(self, stop: threading.Event, every: float) -> None:
        try:
            db = connect(self._dir)
            db.execute(f"PRAGMA wal_autocheckpoint={_LOG_PAGES}")
            try:
                behind = False
                while not stop.wait(every / 4 if behind else every):
                    behind = _settle_step(db, self.target, self.run_id)
                    _cut_logs(db, self._dir)
            finally:
                db.close()
        except (OSError, sqlite3.Error):
            # Left to the final `settle`, in the run's own thread: it applies the rest of
            # the journal, or stops the run with the error.
            return

    # -- accounting --------------------------------------------------------------------

    def accepted(self) -> Iterator[tuple[str, str, str | None, str | None]]:
        """What the platform accepted on this target in this run, as (sourceUuid,
        messageUuid, department, customer), by sourceUuid; read as it goes."""
        yield from self._db.execute(
            f"{ACCEPTED_ROWS} {ACCEPTED_FROM} WHERE a.target = ? AND a.run_id = ? "
            "ORDER BY a.source_uuid",
            (self.target, self.run_id),
        )

    def counts(self) -> dict[str, int]:
        """Counts per contract name for the current run."""
        by_state = dict(
            self._db.execute(
                "SELECT COALESCE(o.state, m.state), COUNT(*) FROM msg m "
                "LEFT JOIN outcome o ON o.msg_id = m.id GROUP BY 1"
            )
        )
        (rejected,) = self._db.execute("SELECT COUNT(*) FROM rejected").fetchone()
        return {
            "rejected": int(rejected),
            "accepted": int(by_state.get(State.ACCEPTED, 0)),
            "failed": int(by_state.get(State.FAILED, 0)),
            "notSent": int(by_state.get(State.PENDING, 0) + by_state.get(State.IN_FLIGHT, 0)),
            "alreadyAccepted": int(by_state.get(State.ALREADY_ACCEPTED, 0)),
        }

    def plan(self, chunk_size: int) -> Iterator[tuple[str, str, int, int]]:
        """(department, customer, messages, requests at most chunk_size each) still to send."""
        for dep, cus, n in self._db.execute(
            "SELECT k.department, k.customer, COUNT(*) FROM msg m JOIN keys k ON k.id = m.key_id "
            f"WHERE m.state = {_PENDING} GROUP BY m.key_id ORDER BY m.key_id"
        ):
            yield dep, cus, n, -(-n // chunk_size)

    def failures(self, *, rejected_only: bool = False) -> Iterator[Failure]:
        """Every rejected, failed or unsent row of the run, in source and line order."""
        query = f"""
            SELECT src, line, source_uuid, department, customer, 'rejected', 0, NULL, errors
              FROM rejected
            UNION ALL
            SELECT m.src, m.line, m.source_uuid, k.department, k.customer,
                   CASE COALESCE(o.state, m.state) WHEN {_FAILED} THEN 'failed' ELSE 'notSent' END,
                   COALESCE(IIF(o.msg_id IS NULL, m.retryable, o.retryable), 1),
                   IIF(o.msg_id IS NULL, m.http_status, o.http_status),
                   IIF(o.msg_id IS NULL, m.errors, o.errors)
              FROM msg m JOIN keys k ON k.id = m.key_id LEFT JOIN outcome o ON o.msg_id = m.id
             WHERE COALESCE(o.state, m.state) IN ({_PENDING}, {_FAILED}, {_IN_FLIGHT}) AND NOT ?
            ORDER BY 1, 2"""
        for r in self._db.execute(query, (rejected_only,)):
            yield Failure(
                source=r[0],
                line=r[1],
                source_uuid=r[2],
                department=r[3],
                customer=r[4],
                stage=r[5],
                retryable=bool(r[6]),
                http_status=r[7],
                errors=orjson.loads(r[8]) if r[8] else [],
            )
