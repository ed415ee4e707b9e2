"""The journal and its settling: in steps while sending, or at once, to the same ledger."""

from __future__ import annotations

import linecache
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import histimport.ledger as ledger_module
from histimport.ledger import Ledger
from histimport.records import Outcome, Pending, State
from histimport.staging import Staging

from .factory import interleaved, message, recording, stage

TARGET = "http://platform.test/communications"


def staged(state_dir: Path, rows: int, *, refused: tuple[str, ...] = ()) -> Ledger:
    """A ledger with `rows` messages staged and ready to send; `refused` were refused by an
    earlier run (and are carried, so: sent again only when not carried)."""
    ledger = Ledger(state_dir)
    if refused:
        ledger._db.executemany(
            "INSERT INTO refused VALUES (?, ?, 400, NULL, 0)", [(TARGET, u) for u in refused]
        )
    ledger.begin_run("load", TARGET)
    source = list(interleaved(5, -(-rows // 5)))[:rows]
    WAITING[id(ledger)] = [m for _, _, m in stage(ledger, state_dir, source, carry_refused=False)]
    return ledger


WAITING: dict[int, list[Pending]] = {}


def pending(ledger: Ledger) -> list[Pending]:
    """The messages `staged` recorded to send, in input order."""
    return WAITING[id(ledger)]


# One answer: which messages (by position) and what became of them.
KINDS = {
    "accepted": (State.ACCEPTED, 200, False),
    "retryable": (State.FAILED, 503, True),
    "refused": (State.FAILED, 400, False),
    "held": (State.PENDING, None, True),
}
answers = st.lists(
    st.tuples(
        st.sampled_from(sorted(KINDS)),
        st.lists(st.integers(0, 29), min_size=1, max_size=6, unique=True),
        st.booleans(),  # settle after this answer?
    ),
    max_size=25,
)


def replay(ledger: Ledger, plan: list[tuple[str, list[int], bool]], *, in_steps: bool) -> None:
    messages = pending(ledger)
    for n, (kind, picks, cut) in enumerate(plan):
        chosen = [messages[i] for i in picks]
        ledger.mark_in_flight(chosen)
        state, status, retryable = KINDS[kind]
        errors = () if state is State.ACCEPTED else ({"errorCode": kind.upper()},)
        ledger.record(
            [
                Outcome(m.id, m.source_uuid, state, status, retryable, errors, f"m-{m.id}-{n}")
                for m in chosen
            ]
        )
        if in_steps and cut:
            ledger.settle()
    ledger.settle()


def tables(ledger: Ledger) -> dict[str, Any]:
    db = ledger._db
    return {
        "outcome": db.execute("SELECT * FROM outcome ORDER BY msg_id").fetchall(),
        "accepted": db.execute(
            "SELECT target, source_uuid, message_uuid FROM accepted ORDER BY 2"
        ).fetchall(),
        "refused": db.execute("SELECT * FROM refused ORDER BY 2").fetchall(),
        "counts": ledger.counts(),
        "failures": list(ledger.failures()),
        "journal": db.execute("SELECT COUNT(*) FROM jl.journal").fetchone(),
    }


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=answers)
def test_settling_in_steps_ends_where_settling_at_once_does(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[str, list[int], bool]]
) -> None:
    """Whatever the answers and wherever the steps fall: the same last word per message,
    the same accepted and refused, and no message both accepted and refused."""
    results = []
    for in_steps in (False, True):
        state = tmp_path_factory.mktemp("state")
        with staged(state, 30, refused=("dep-1.cust-00001.000000",)) as ledger:
            replay(ledger, plan, in_steps=in_steps)
            results.append(tables(ledger))
    once, in_steps = results
    assert in_steps == once
    accepted = {row[1] for row in once["accepted"]}
    assert not accepted & {row[1] for row in once["refused"]}
    assert once["journal"] == (0,)


def test_an_interruption_anywhere_in_recording_a_batch_leaves_the_counts_exact(
    tmp_path: Path,
) -> None:
    """Ctrl-C at any line of `admit` and what it calls (sent by a trace function, in the
    thread that runs the command, as a dry run records): the batch is recorded whole, then
    the interruption is raised, and the rows counted are those the ledger holds."""

    def lines() -> list[dict[str, Any]]:  # anew each time: checking takes the ids out
        made = [message("d", f"c{n % 3}", n) for n in range(8)]
        made.insert(6, {"departmentUUID": "d"})
        return made

    codes = {
        Staging.admit.__wrapped__.__code__,  # type: ignore[attr-defined]
        Staging._record.__code__,
        Staging._found.__code__,
    }
    ran: set[tuple[Any, int]] = set()

    def lines_run(frame: Any, event: str, arg: Any) -> Any:
        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                ran.add((frame.f_code, frame.f_lineno))
            return local

        return local if frame.f_code in codes else None

    with Ledger(tmp_path / "dry") as ledger:
        ledger.begin_run("load", TARGET)
        sys.settrace(lines_run)
        try:
            stage(ledger, tmp_path / "dry", lines())
        finally:
            sys.settrace(None)
    assert len(ran) > 20
    for code, line in sorted(ran, key=lambda at: (at[0].co_name, at[1])):
        raised: list[int] = []

        def trace(frame: Any, event: str, arg: Any) -> Any:
            if frame.f_code is not code:  # noqa: B023
                return None

            def local(frame: Any, event: str, arg: Any) -> Any:
                if event == "line" and frame.f_lineno == line and not raised:  # noqa: B023
                    raised.append(line)  # noqa: B023
                    signal.raise_signal(signal.SIGINT)  # Python raises it at the next step
                return local

            return local

        state_dir = tmp_path / f"state-{code.co_name}-{line}"
        with Ledger(state_dir) as ledger:
            ledger.begin_run("load", TARGET)
            with recording(ledger, state_dir) as (staging, checked):
                rows = checked(lines())
                sys.settrace(trace)
                try:
                    staging.admit(rows)
                except KeyboardInterrupt:
                    pass
                finally:
                    sys.settrace(None)
            assert raised == [line]
            counts = ledger.counts()
            assert staging.rows in (0, len(rows))
            assert counts["notSent"] + counts["rejected"] == staging.rows
            assert len(list(ledger.failures())) == staging.rows


def test_a_repeated_source_uuid_is_rejected_where_it_comes_second_in_the_input(
    tmp_path: Path,
) -> None:
    """Staging holds a customer's rows together, so a later row of a customer seen first in
    a batch may be stored before an earlier row of another: the input order decides."""
    first, *_ = interleaved(1, 1)
    lines = [
        {**first, "customerUUID": "a", "sourceUuid": "x"},
        {**first, "customerUUID": "b", "sourceUuid": "twice"},
        {**first, "customerUUID": "a", "sourceUuid": "twice"},
    ]
    with Ledger(tmp_path / "state") as ledger:
        ledger.begin_run("load", TARGET)
        waiting = stage(ledger, tmp_path / "state", lines)
        (failure,) = ledger.failures(rejected_only=True)
        assert (failure.line, failure.customer, failure.source_uuid) == (3, "a", "twice")
        assert "already read at line 2" in failure.errors[0]["errorDescription"]
        assert [m.source_uuid for _, _, m in waiting] == ["x", "twice"]


def test_a_source_uuid_read_in_an_earlier_batch_is_a_repeat_whatever_the_row_before_was(
    tmp_path: Path,
) -> None:
    """A batch is recorded at once when the unique index proves that no row before had its
    sourceUuids; one that repeats a valid or a rejected row of an earlier batch is recorded
    again with what the lookup finds, its new customers included."""
    first, *_ = interleaved(1, 1)
    batches = [
        [
            {**first, "customerUUID": "a", "sourceUuid": "valid"},
            {**first, "customerUUID": "a", "sourceUuid": "rejected", "sentOn": "never"},
        ],
        [
            {**first, "customerUUID": "a", "sourceUuid": "fresh"},
            {**first, "customerUUID": "b", "sourceUuid": "valid"},
            {**first, "customerUUID": "c", "sourceUuid": "new customer"},
        ],
        [{**first, "customerUUID": "d", "sourceUuid": "rejected"}],
        [{**first, "customerUUID": "e", "sourceUuid": "last"}],
    ]
    state_dir = tmp_path / "state"
    with Ledger(state_dir) as ledger:
        ledger.begin_run("load", TARGET)
        sent: list[tuple[str, str]] = []
        with recording(ledger, state_dir) as (staging, checked):
            for batch in batches:
                sent += [(r.customer, r.source_uuid) for _, r in staging.admit(checked(batch))]
        assert sent == [("a", "valid"), ("a", "fresh"), ("c", "new customer"), ("e", "last")]
        repeats = {
            f.line: f.errors[0]["errorDescription"]
            for f in ledger.failures(rejected_only=True)
            if f.errors[0]["errorCode"] == "DUPLICATE_SOURCE_UUID"
        }
        assert repeats == {
            4: 'sourceUuid: "valid" was already read at line 1',
            6: 'sourceUuid: "rejected" was already read at line 2',
        }
        customers = ledger._db.execute(
            "SELECT k.customer FROM msg m JOIN keys k ON k.id = m.key_id ORDER BY m.id"
        ).fetchall()
        assert [c for (c,) in customers] == ["a", "a", "c", "e"]
        assert ledger.counts()["notSent"] == 4


def record_batches(
    state_dir: Path, batches: list[list[dict[str, Any]]], last: Any = None
) -> dict[int, str]:
    """Record batches of rows (lines 1, 2... of one source), the last one through `last`
    (staging, rows) when given; the descriptions of the repeats, by line."""
    first, *_ = interleaved(1, 1)
    with Ledger(state_dir) as ledger:
        ledger.begin_run("load", TARGET)
        with recording(ledger, state_dir) as (staging, checked):
            for n, batch in enumerate(batches):
                rows = checked({**first, **r} for r in batch)
                if last is not None and n == len(batches) - 1:
                    last(staging, rows)
                else:
                    staging.admit(rows)
        return {
            f.line: f.errors[0]["errorDescription"]
            for f in ledger.failures(rejected_only=True)
            if f.errors[0]["errorCode"] == "DUPLICATE_SOURCE_UUID"
        }


@pytest.mark.parametrize(
    "batches",
    [
        # The second row, a repeat, is rejected: the third is a repeat of the first still.
        [[{"sourceUuid": "x"}], [{"sourceUuid": "x"}], [{"sourceUuid": "x"}]],
        # A row rejected for its own reasons before a repeat, in the same batch.
        [[{"sourceUuid": "x"}], [{"sourceUuid": "x", "sentOn": "never"}, {"sourceUuid": "x"}]],
    ],
)
def test_a_repeat_names_the_first_row_with_its_source_uuid_whatever_came_between(
    tmp_path: Path, batches: list[list[dict[str, Any]]]
) -> None:
    repeats = record_batches(tmp_path / "state", batches)
    assert repeats[3] == 'sourceUuid: "x" was already read at line 1'


def test_ctrl_c_while_a_batch_is_refused_by_the_index_waits_for_it_to_be_recorded(
    tmp_path: Path,
) -> None:
    """The batch repeats a sourceUuid of the batch before: the index refuses it, and it is
    recorded again after a lookup. A Ctrl-C that comes while it is refused waits for it to
    be recorded, then is raised."""
    code = Staging._record.__code__
    raised: list[int] = []

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if (
                event == "line"
                and not raised
                and "INSERT INTO keys" in linecache.getline(code.co_filename, frame.f_lineno)
            ):
                raised.append(frame.f_lineno)
                signal.raise_signal(signal.SIGINT)
            return local

        return local

    counted: list[int] = []

    def last(staging: Staging, rows: list[Any]) -> None:
        sys.settrace(trace)
        try:
            with pytest.raises(KeyboardInterrupt):
                staging.admit(rows)
        finally:
            sys.settrace(None)
        counted.append(staging.rows)

    repeats = record_batches(
        tmp_path / "state", [[{"sourceUuid": "x"}], [{"sourceUuid": "x"}]], last
    )
    assert raised and counted == [2]
    assert repeats == {2: 'sourceUuid: "x" was already read at line 1'}


@pytest.mark.parametrize("state", [State.ACCEPTED, State.FAILED])
def test_the_first_message_sent_alone_is_recorded_as_answered_not_sent_again(
    tmp_path: Path, state: State
) -> None:
    rows = [message("d", "c", n) for n in range(3)]
    state_dir = tmp_path / "state"
    with Ledger(state_dir) as ledger:
        ledger.begin_run("load", TARGET)
        with recording(ledger, state_dir) as (staging, checked):
            batch = checked(rows)
            first = batch[0].source_uuid
            staging.first_sent(Outcome(0, first, state, 400 if state is State.FAILED else 200))
            sent = [r.source_uuid for _, r in staging.admit(batch)]
        assert sent == [r["sourceUuid"] for r in rows[1:]]
        (recorded,) = ledger._db.execute(
            "SELECT state FROM msg WHERE source_uuid = ?", (first,)
        ).fetchone()
        assert recorded == state


def test_the_thread_settles_while_answers_keep_coming(tmp_path: Path) -> None:
    with staged(tmp_path / "state", 300) as ledger:
        messages = pending(ledger)
        with ledger.settling(every=0.005):
            for i in range(0, 300, 10):
                chunk = messages[i : i + 10]
                ledger.mark_in_flight(chunk)
                ledger.record([Outcome(m.id, m.source_uuid, State.ACCEPTED, 200) for m in chunk])
            # Before the run's own settle: the thread has applied the journal.
            assert _eventually(lambda: _accepted(tmp_path / "state") == 300)
        ledger.settle()
        assert ledger.counts()["accepted"] == 300
        assert ledger._db.execute("SELECT COUNT(*) FROM jl.journal").fetchone() == (0,)


def test_a_failing_thread_leaves_its_work_to_the_final_settle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = ledger_module._settle_step
    calls: list[str] = []

    def failing_in_the_thread(db: sqlite3.Connection, target: str, run_id: int) -> int:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "histimport-settle":
            raise sqlite3.OperationalError("disk I/O error")
        return step(db, target, run_id)

    monkeypatch.setattr(ledger_module, "_settle_step", failing_in_the_thread)
    with staged(tmp_path / "state", 50) as ledger:
        messages = pending(ledger)
        with ledger.settling(every=0.001):
            ledger.record([Outcome(m.id, m.source_uuid, State.ACCEPTED, 200) for m in messages])
            assert _eventually(lambda: "histimport-settle" in calls)
        assert _accepted(tmp_path / "state") == 0
        ledger.settle()
        assert ledger.counts()["accepted"] == 50
        assert _accepted(tmp_path / "state") == 50


def _accepted(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "ledger.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM accepted").fetchone()[0])


def _eventually(condition: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(autouse=True)
def _no_threads_left() -> Iterator[None]:
    yield
    assert not any(t.name == "histimport-settle" for t in threading.enumerate())


def test_the_journal_log_stays_bounded_while_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However long the run, the journal's write-ahead log starts over past a bound instead
    of growing with the answers (an import of 100 million messages writes gigabytes). The
    bound is lowered to 1 MB here, so that a short test crosses it many times."""
    monkeypatch.setattr(ledger_module, "_LOG_PAGES", 250)
    state = tmp_path / "state"
    with staged(state, 100) as ledger:
        messages = pending(ledger)
        written = 0
        with ledger.settling(every=0.01):
            for n in range(2000):
                words = [
                    Outcome(m.id, m.source_uuid, State.FAILED, 503, True, (), f"{n:036d}")
                    for m in messages
                ]
                ledger.record(words)
                written += len(orjson.dumps([[m.id, m.source_uuid, f"{n:036d}"] for m in words]))
                time.sleep(0.0002)
        log = (state / "journal.sqlite3-wal").stat().st_size
        # About 30 MB of log pages were appended (a record spans several pages); the log
        # starts over past 1 MB, once the thread, every 10 ms and a step, sees it there.
        assert written > 12_000_000
        assert log < 12_000_000, (log, written)


def test_a_state_dir_with_the_journal_in_the_ledger_is_taken_over(tmp_path: Path) -> None:
    """A state dir left by a version that kept the journal inside ledger.sqlite3, by a run
    that was killed: its answers are applied, not lost, before the next run starts."""
    state = tmp_path / "state"
    with staged(state, 20) as ledger:
        messages = pending(ledger)
        db = ledger._db
        db.execute("ALTER TABLE stage_meta DROP COLUMN settled")
        db.execute(
            "CREATE TABLE main.journal(seq INTEGER PRIMARY KEY, state INTEGER, "
            "http_status INTEGER, retryable INTEGER, errors BLOB, items BLOB)"
        )
        db.execute(
            "INSERT INTO main.journal(state, http_status, retryable, items) VALUES (1, 200, 0, ?)",
            (orjson.dumps([[m.id, m.source_uuid, f"m-{m.id}"] for m in messages[:12]]),),
        )
        db.execute("DROP TABLE jl.journal")
    for leftover in state.glob("journal.sqlite3*"):
        leftover.unlink()
    with Ledger(state) as ledger:
        ledger.begin_run("load", TARGET)
        accepted = ledger._db.execute("SELECT source_uuid FROM accepted ORDER BY 1").fetchall()
        assert [u for (u,) in accepted] == sorted(m.source_uuid for m in messages[:12])
        assert ledger._db.execute("SELECT settled FROM stage_meta").fetchone() == (0,)


def test_a_lost_journal_does_not_lock_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with staged(state, 5):
        pass
    for journal in state.glob("journal.sqlite3*"):
        journal.unlink()
    with Ledger(state) as ledger:
        ledger.begin_run("load", TARGET)
        assert ledger.staged_rows() == 0


def test_status_reads_a_state_dir_whose_name_needs_quoting(tmp_path: Path) -> None:
    from histimport.status import status

    state = tmp_path / "odd #1 ?x %41"
    with staged(state, 10) as ledger:
        ledger.settle()
    before = sorted(p.name for p in tmp_path.iterdir())
    summary = status(state)
    assert summary["lastRun"] == {"pending": 10, "rejected": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray file


@pytest.mark.parametrize(
    "write",
    [
        lambda ledger: ledger.forget_refusals(),
        lambda ledger: ledger.record_sources([(0, "e.jsonl", "jsonl", 1, "00", None)]),
        lambda ledger: ledger.staged_among(["u"], [(0, 1, None)]),
    ],
)
def test_a_write_the_ledger_cannot_make_is_a_ledger_error(tmp_path: Path, write: Any) -> None:
    """A full disk, a state dir gone: exit 3 with what to do, not a traceback."""
    from histimport.errors import LedgerError

    ledger = Ledger(tmp_path / "state")
    ledger.begin_run("load", "t")
    ledger.close()
    with pytest.raises(LedgerError, match="cannot write"):
        write(ledger)


def test_the_schema_has_a_version_and_a_state_dir_from_before_takes_it(tmp_path: Path) -> None:
    """A state dir written before the schema had versions keeps what it recorded; one
    written by a newer histimport is refused, not misread."""
    import sqlite3

    from histimport.errors import LedgerError
    from histimport.ledger import SCHEMA_VERSION

    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "ledger.sqlite3")
    db.executescript(
        "CREATE TABLE accepted(target TEXT, source_uuid TEXT, message_uuid TEXT, "
        "run_id INTEGER, at TEXT, PRIMARY KEY (target, source_uuid)) WITHOUT ROWID;"
        "INSERT INTO accepted VALUES ('t', 's1', 'm1', 1, 'then');"
    )
    db.close()
    with Ledger(old):
        pass
    db = sqlite3.connect(old / "ledger.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert db.execute("SELECT source_uuid FROM accepted").fetchall() == [("s1",)]
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LedgerError, match="newer histimport"):
        Ledger(old)
    db = sqlite3.connect(old / "ledger.sqlite3")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    db.close()
    with Ledger(old):  # the refused open let go of the state dir's lock
        pass
