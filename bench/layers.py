"""Where a load's client CPU goes, thread by thread, and the SQLite index beneath recording.

    .venv/bin/python bench/layers.py [--messages 100000] [--customers 1000] [--repeat 3]

1. Runs `histimport load` in this process against the benchmark server at 0 ms (a fresh
   server and state dir each run), with the check workers and without them, and prints
   the CPU time of each of its threads (`time.thread_time()` as each thread ends), of its
   check workers (the children it reaped) and the start-up (an empty export), per message:
   - `histimport-read`: reading, recording batches of rows in the staging, chunking and
     spilling, handing chunks to the event loop (and, without workers, parsing and checking);
   - the main thread: start-up, the event loop's HTTP exchanges through httpx, the journal
     of requests and answers, the delivery's bookkeeping;
   - `histimport-settle`: settling answers into the ledger.
2. Times each stage alone, in this process, on the same rows (the best of `--repeat`
   passes, process CPU a message): reading lines and parsing them; mapping and checking;
   recording them in the staging (batches of 4,096); chunking and spilling them (a 16 MiB
   budget, as a run holds); building the request bodies; reading 100-message answers;
   journalling the requests and their answers, then settling them into the ledger.
3. Times SQLite alone doing what recording did to its sourceUuid index before the unique
   index proved a batch new (recording a target with history still does): batches of 4,096
   random UUIDs looked up, then inserted and committed in WAL mode, at 100,000 and
   1,000,000 rows; with the UUID text indexed, and with a 64-bit integer of it instead.

Informational: exits 0 unless a load fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from gen_data import data_file
from run import DATA, OUT, Profile, Server, client_argv, client_env

_ended: dict[str, float] = {}
_original_run = threading.Thread.run


def _timed_run(self: threading.Thread) -> None:
    try:
        _original_run(self)
    finally:
        _ended[self.name] = _ended.get(self.name, 0.0) + time.thread_time()


def load(source: Path, base_url: str, workdir: Path, workers: int | None) -> dict[str, float]:
    """CPU seconds of one in-process `histimport load`, by thread and for its workers."""
    from histimport.cli import app

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    argv = client_argv("histimport", source, base_url, workdir)[1:]  # as run.py runs it
    if workers is not None:
        argv += ["--check-workers", str(workers)]
    _ended.clear()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    main_before = time.thread_time()
    status: int | str | None = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(workdir):
        try:
            app(argv, prog_name="histimport", standalone_mode=True)
        except SystemExit as exc:
            status = exc.code
    main = time.thread_time() - main_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if status not in (0, None):
        raise SystemExit(f"histimport load exited {status}; see {workdir}")
    return {
        "main": main,
        "read": _ended.get("histimport-read", 0.0),
        "settle": _ended.get("histimport-settle", 0.0),
        "workers": (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime),
    }


def index_cost(rows: int, key: str, batch: int = 4096) -> float:
    """µs a row to look up and insert `rows` random UUIDs, committed a batch at a time."""
    folder = OUT / "layers" / "sqlite"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db = sqlite3.connect(folder / "st.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA cache_size=-16384")
    column = "u" if key == "text" else "h"
    db.execute("CREATE TABLE msg(id INTEGER PRIMARY KEY, h INTEGER, u TEXT, src INTEGER)")
    db.execute(f"CREATE INDEX msg_key ON msg({column})")
    uuids = [str(uuid.uuid4()) for _ in range(rows)]
    started = time.process_time()
    for first in range(0, rows, batch):
        part = uuids[first : first + batch]
        keys = part if key == "text" else [hash(u) & (2**62 - 1) for u in part]
        found = db.execute(
            f"SELECT m.id FROM json_each(?) j JOIN msg m ON m.{column} = j.value",
            (json.dumps(keys),),
        )
        found.fetchall()
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO msg VALUES (?, ?, ?, 0)",
            [(first + i, hash(u) & (2**62 - 1), u) for i, u in enumerate(part)],
        )
        db.execute("COMMIT")
    spent = time.process_time() - started
    db.close()
    return spent * 1e6 / rows


def stage_costs(source: Path, repeat: int) -> dict[str, float]:
    """Process CPU µs a message of each stage alone, the best of `repeat` passes."""
    import functools
    import gc
    import tempfile

    import orjson

    from histimport.batch import Envelope
    from histimport.check import Valid, check_row
    from histimport.chunking import Chunker, Spill
    from histimport.ledger import Ledger
    from histimport.mapping import Mapper
    from histimport.models import read_answer
    from histimport.read import read_jsonl
    from histimport.records import Outcome, Pending, State
    from histimport.staging import Staging

    target = "http://127.0.0.1/communications"
    mapper = Mapper("jsonl", None, str(source), generate_source_uuid=False)
    check = functools.partial(check_row, notify=False)

    def parsed() -> list[Any]:
        with source.open("rb") as stream:
            return list(read_jsonl(stream, 0, max_line_bytes=1 << 24))

    rows = [check(mapper(r)) for r in parsed()]
    raw: list[Any] = []  # rows to check, read anew before each pass: checking changes them
    valid = [r for r in rows if isinstance(r, Valid)]
    pending = [
        (r.department, r.customer, Pending(n, r.source_uuid, r.body))
        for n, r in enumerate(valid, 1)
    ]
    envelope = Envelope(None)
    chunks: list = []

    def read() -> None:
        with source.open("rb") as stream:
            for _ in read_jsonl(stream, 0, max_line_bytes=1 << 24):
                pass

    def checks() -> None:
        for r in raw:
            check(mapper(r))

    def record(folder: Path) -> None:
        with Ledger(folder) as ledger:
            ledger.begin_run("load", target)
            staging = Staging(
                folder, run_id=ledger.run_id, target=target, paths=[str(source)], carry_refused=True
            )
            for first in range(0, len(rows), 4096):
                staging.admit(rows[first : first + 4096])
            staging.close()

    def chunk(folder: Path) -> None:
        chunks.clear()
        chunker = Chunker(
            chunks.append,
            chunk_size=100,
            max_bytes=lambda: 5_000_000,
            envelope=envelope,
            spill=Spill(folder),
        )
        for department, customer, message in pending:
            chunker.add(department, customer, message)
        chunker.flush()

    def bodies() -> None:
        for c in chunks:
            envelope.body(c.messages)

    answers: list[bytes] = []

    def answer() -> None:
        if not answers:  # 50 answers of the chunks' sourceUuids, each read as many times
            for c in chunks[:50]:
                ids = [m.source_uuid for m in c.messages]
                entries = [{"sourceUuid": u, "messageUuid": str(uuid.uuid4())} for u in ids]
                answers.append(
                    orjson.dumps(
                        {"saveMessageResponse": entries, "succesfullySubmittedSourceUuids": ids}
                    )
                )
        for _ in range(len(chunks) // len(answers)):
            for content in answers:
                read_answer(content)

    journalled: list[Any] = []  # the ledger the journal stage leaves to settle

    def journal(folder: Path) -> None:
        ledger = Ledger(folder)
        ledger.begin_run("load", target)
        journalled.append(ledger)
        for c in chunks:
            ledger.mark_in_flight(c.messages)
            outcomes = [
                Outcome(m.id, m.source_uuid, State.ACCEPTED, 200, message_uuid=m.source_uuid)
                for m in c.messages
            ]
            ledger.record(outcomes, (c.department, c.customer))

    def settle(folder: Path) -> None:
        ledger = journalled.pop()
        ledger.settle()
        ledger.close()
        shutil.rmtree(ledger._dir, ignore_errors=True)

    stages: dict[str, Any] = {
        "read lines, parse JSON": read,
        "map and check": checks,
        "record in the staging": record,
        "chunk and spill": chunk,
        "build request bodies": bodies,
        "read answers": answer,
        "journal requests, answers": journal,
        "settle into the ledger": settle,
    }
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, function in stages.items():
            folder = Path(tempfile.mkdtemp(dir=OUT / "layers"))
            if function is checks:
                raw[:] = parsed()  # untimed
            gc.collect()
            started = time.process_time()
            function(folder) if function.__code__.co_argcount else function()
            spent = time.process_time() - started
            if function is not journal:  # settling deletes the journal's
                shutil.rmtree(folder, ignore_errors=True)
            best[name] = min(best.get(name, spent), spent)
    return {name: spent * 1e6 / len(rows) for name, spent in best.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--stages-only", action="store_true", help="time each stage alone, without the runs"
    )
    args = parser.parse_args()
    threading.Thread.run = _timed_run  # type: ignore[method-assign]
    # The benchmark's credentials, and no other HISTIMPORT_ setting of the shell (as run.py).
    os.environ.clear()
    os.environ.update(client_env())
    source = data_file(DATA, args.messages, args.customers)
    empty = OUT / "layers" / "empty.jsonl"
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_text("")
    per = 1e6 / args.messages
    print(f"{args.messages:,} messages over {args.customers:,} customers, interleaved, 0 ms")
    print("CPU in µs a message: main thread (start-up included), read, settle, workers, total")
    for workers in () if args.stages_only else (None, 0):
        label = "default check workers" if workers is None else "--check-workers 0"
        for n in range(args.repeat):
            server = Server(Profile("0ms", 0), "memory", OUT / "layers" / "server.log")
            try:
                start = load(empty, server.base_url, OUT / "layers" / "empty", workers)
                cpu = load(source, server.base_url, OUT / "layers" / "run", workers)
            finally:
                server.stop()
            total = sum(cpu.values())
            print(
                f"{label}, run {n + 1}: main {cpu['main'] * per:.1f} "
                f"(an empty export: {start['main'] * per:.1f}), read {cpu['read'] * per:.1f}, "
                f"settle {cpu['settle'] * per:.1f}, workers {cpu['workers'] * per:.1f}, "
                f"total {total * per:.1f}"
            )
    print("Each stage alone, in this process, µs a message (best of the passes):")
    for name, cost in stage_costs(source, args.repeat).items():
        print(f"  {name:<24} {cost:5.1f}")
    print("SQLite, batches of 4,096 looked up, inserted and committed (WAL), µs a row:")
    for rows in (100_000, 1_000_000):
        text, integer = index_cost(rows, "text"), index_cost(rows, "int")
        print(f"{rows:>9,} rows: UUID text index {text:.1f}, 64-bit integer index {integer:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
