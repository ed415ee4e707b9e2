"""The library API: `load`, `retry` and `validate` — one pipeline, read -> check -> stage ->
deliver -> account -> write. Nothing here knows of the command line."""

from __future__ import annotations

import asyncio
import gc
import itertools
import operator
import os
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from .batch import Envelope
from .check import Rejected, Valid, check_row, normalise_timestamp
from .config import Config
from .deliver import Deliverer, DeliveryStats, Pause
from .errors import ExitStatus, InvariantError, UsageError
from .fanout import Fanout
from .ledger import Ledger
from .mapping import Mapper, Mapping
from .outputs import (
    NOT_READ,
    REPORT_FORMAT,
    FailedEntry,
    check_outputs,
    write_failed,
    write_report,
    writing,
)
from .read import (
    READ_ERRORS,
    UNREADABLE,
    RawRow,
    Source,
    as_row,
    check_readable,
    detect_format,
    jsonl_lines,
    named_format,
    open_source,
    read_jsonl,
)
from .read_csv import read_csv
from .records import Outcome, Pending, State
from .shard import shard_of
from .signals import deferred, install_async_signals, sigterm_as_interrupt
from .target import check_base_url

if TYPE_CHECKING:
    from .resend import Selection

WARNINGS_KEPT = 10_000
"""Warnings are counted without limit; the first ones are kept for the outputs."""


class Observer(Protocol):
    """Hooks for a progress display; every method is optional to act on."""

    def staging(self, source: str) -> None: ...
    def reading(self, done: int, total: int | None) -> None: ...
    def sending(self, messages: int) -> None: ...
    def progress(self, accepted: int, failed: int) -> None: ...
    def paused(self, pause: Pause) -> None: ...
    def done(self) -> None: ...


class Silent:
    """An observer that acts on nothing: subclass it to act on some events only."""

    def staging(self, source: str) -> None:
        pass

    def reading(self, done: int, total: int | None) -> None:
        pass

    def sending(self, messages: int) -> None:
        pass

    def progress(self, accepted: int, failed: int) -> None:
        pass

    def paused(self, pause: Pause) -> None:
        pass

    def done(self) -> None:
        pass


@dataclass
class RunResult:
    """What a run did: its counts, its report and how the process should exit."""

    exit_status: ExitStatus
    counts: dict[str, int]
    report: dict[str, Any]
    failed_path: Path | None  # None: no failed file was written (validate without --failed-out)
    preview: list[str]
    plan: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None


def load(
    sources: Sequence[str | os.PathLike[str]],
    config: Config | None = None,
    *,
    observer: Observer | None = None,
) -> RunResult:
    """Import sources: read, validate, send, and account for every row."""
    return Run(config or Config(), observer).execute([str(s) for s in sources], "load")


def validate(
    sources: Sequence[str | os.PathLike[str]],
    config: Config | None = None,
    *,
    observer: Observer | None = None,
) -> RunResult:
    """Check sources offline (no network, no credentials): `load --dry-run`."""
    cfg = replace(config or Config(), dry_run=True)
    return Run(cfg, observer).execute([str(s) for s in sources], "validate")


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Staging allocates millions of short-lived, acyclic objects: run the cycle collector
    less often meanwhile (it still runs), and leave what was imported before out of it."""
    gc.freeze()
    previous = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


MAX_CHECK_WORKERS = 4
IN_PROCESS_ROWS = 2_000
"""With the default --check-workers, a source's first rows are checked in the main process:
a small source is done before forking would pay off (`validate` of 2,000 rows took as long
either way, best of five; of 5,000 rows, 17 ms less with two workers)."""
_BATCH_BYTES = 256 * 1024
_valid_fields = operator.attrgetter(*(f.name for f in fields(Valid)))
"""A Valid row's fields as a tuple, in the order Valid(*fields) takes them."""


def _checked_in_workers(
    lines: Iterator[tuple[int, bytes] | RawRow],
    index: int,
    mapper: Mapper,
    check: Callable[[RawRow], Valid | Rejected],
    workers: int,
    *,
    warm_up: bool,
) -> Iterator[Valid | Rejected]:
    """Parse, map and check JSONL lines in forked workers, in batches, in input order; with
    `warm_up`, the first IN_PROCESS_ROWS here, and no workers for a source that short."""

    def work(batch: list[tuple[int, bytes] | RawRow]) -> list[Valid | Rejected]:
        out = []
        for item in batch:
            row = mapper(as_row(item, index))
            if row is not None:
                out.append(check(row))
        return out

    def packed(batch: list[tuple[int, bytes] | RawRow]) -> list[tuple[Any, ...] | Rejected]:
        # A valid row travels back as a plain tuple: a tenth of a dataclass's pickling cost.
        return [_valid_fields(r) if isinstance(r, Valid) else r for r in work(batch)]

    if warm_up:
        first = list(itertools.islice(lines, IN_PROCESS_ROWS))
        yield from work(first)
        if len(first) < IN_PROCESS_ROWS:
            return
    with Fanout(packed, workers) as fanout:
        for checked in fanout.map(_batches(lines)):
            for r in checked:
                yield Valid(*r) if type(r) is tuple else r


def _batches(lines: Iterator[tuple[int, bytes] | RawRow]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    size = 0
    for item in lines:
        batch.append(item)
        size += len(item[1]) if isinstance(item, tuple) else 64
        if size >= _BATCH_BYTES:
            yield batch
            batch = []
            size = 0
    if batch:
        yield batch


_READING_EVERY = 4096
"""Rows between two reports of how much of a source was read."""


def _broke_off(row: Rejected) -> bool:
    return row.source_uuid is None and any(p.code == UNREADABLE for p in row.problems)


def _file_size(path: str) -> int | None:
    """The size of a regular file (for gzip, compressed: what `Source.size` counts)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _realpath(source: Source) -> str | None:
    return None if source.is_stdin else os.path.realpath(source.path)


def open_sources(
    paths: Sequence[str], fmt: str | None, formats: dict[str, str] | None = None
) -> list[Source]:
    """The run's sources, each checked to be readable before anything is sent; `formats`
    are those a failed file recorded, for `--format` left out."""
    if not paths:
        raise UsageError("no source given", hint="name one or more .jsonl or .csv files")
    known = formats or {}
    if fmt is not None and len(paths) > 1:
        # --format is every source's: one named for the other format was named by mistake,
        # or is to be read in a run of its own (one source alone is read as --format says).
        for path in paths:
            named = named_format(path)
            if named is not None and named != fmt:
                raise UsageError(
                    f"{path}: named as {named}, but --format {fmt} applies to every source",
                    hint="read it in a run of its own (with the same --state-dir)"
                    if formats is None
                    else "leave out --format: retry reads each source in the format its "
                    "failed file records",
                )
    sources = [Source(path=p, format=detect_format(p, fmt or known.get(p))) for p in paths]
    for source in sources:
        check_readable(source)
    if sum(s.is_stdin for s in sources) > 1:
        raise UsageError("stdin (-) can be read only once")
    return sources


def source_fields(
    path: str, fmt: str | None, *, delimiter: str | None = None, encoding: str | None = None
) -> list[str]:
    """A source's field names: its CSV header, or the dotted paths of its first JSON object."""
    (source,) = open_sources([path], fmt)
    with open_source(source) as stream:
        if source.format == "csv":
            rows = read_csv(
                stream, 0, max_line_bytes=1 << 24, delimiter=delimiter, encoding=encoding
            )
            first = next(rows, None)
            if first is None or first.header is None:
                raise UsageError(f"{path}: no header row")
            return first.header
        for row in read_jsonl(stream, 0, max_line_bytes=1 << 24, name=path):
            if row.data is not None:
                return _paths(row.data)
    raise UsageError(f"{path}: no JSON object found")


def _paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _paths(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


class Run:
    """One load, retry or validate run, from its sources to its outputs."""

    def __init__(
        self,
        config: Config,
        observer: Observer | None,
        selection: Selection | None = None,
        *,
        include_permanent: bool = False,
    ) -> None:
        self.config = config
        self.observer = observer or Silent()
        self.selection = selection
        self.include_permanent = include_permanent
        self.read = 0
        self.interrupted = False
        self.read_whole = True  # every row of the sources was read and staged
        self.yielded: dict[int, int] = {}  # by source index: the last line handed on
        self.read_through: set[int] = set()  # the sources read to their end
        self.warning_count = 0
        self.warnings: list[dict[str, Any]] = []
        self.first_outcome: Outcome | None = None  # of the message sent alone, if answered

    def execute(
        self, paths: list[str], command: str, formats: dict[str, str] | None = None
    ) -> RunResult:
        config = self.config
        sources = open_sources(paths, config.format, formats)
        outputs = {"--failed-out": config.failed_out}
        if config.report is not None:
            outputs["--report"] = config.report
        check_outputs(outputs, sources)
        started = time.monotonic()
        with ExitStack() as stack:
            # SIGTERM interrupts as Ctrl-C does, instead of killing the process outright.
            stack.enter_context(sigterm_as_interrupt())
            base_url = self._target(stack)
            state_dir = config.state_dir
            if config.dry_run:
                state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            ledger = Ledger(state_dir)
            stack.callback(ledger.close)
            ledger.begin_run(command, base_url or "")
            deliverer = None
            try:
                if not config.dry_run:
                    assert base_url is not None
                    # Made before anything is read: a --ca-bundle or a proxy setting that
                    # cannot be used is told at once, not once a large export was staged.
                    deliverer = self._deliverer(ledger, base_url)
                rows = self._checked(sources)
                first_run = not ledger.read_before(map(_realpath, sources))
                if deliverer is not None and first_run and config.shard is None:
                    # A first run over these sources (a resumed one cannot tell yet whether
                    # a source changed: it sends nothing before it has read them whole). Not
                    # a shard: the shards' failed files are retried together, in a state
                    # dir that knows none of their first messages.
                    rows = self._first_contact(ledger, deliverer, rows)
                self._stage(ledger, rows)
            except UsageError:  # or a source found unreadable as a whole: nothing is sent
                ledger.finish_run("usage", {})
                raise
            if self.read_whole:  # a source read in part has no size nor checksum to keep
                self._check_unchanged(ledger, sources, command)
                ledger.record_sources(
                    (i, s.path, s.format, s.size, s.sha256, _realpath(s))
                    for i, s in enumerate(sources)
                )
            try:
                with deferred():
                    ledger.finish_staging(
                        carry_refused=not (self.include_permanent or config.fresh)
                    )
                    if config.fresh and not self.interrupted:
                        # Only once every row is staged: a --fresh run stopped before that
                        # leaves them for the next run.
                        ledger.forget_refusals()
                    first = self.first_outcome
                    if first is not None and first.state is State.FAILED:
                        # Refused, or not confirmed (a 202): listed, not sent again now.
                        ledger.settle_staged(first)
            except KeyboardInterrupt:
                self.interrupted = True
            stats = deliverer.stats if deliverer is not None else None
            sent = False
            if self.interrupted:
                # Rows read but not yet handed to the ledger when the run was stopped are
                # not part of this run: a resumed run reads them again.
                self.read = ledger.staged_rows()
            elif deliverer is not None and not deliverer.stopping:
                sent = True
                try:
                    self._deliver(ledger, deliverer)
                except KeyboardInterrupt:
                    # Just before sending began or just after it ended: while it runs, its
                    # own handlers stop it and settle what is in flight.
                    self.interrupted = True
                except BaseException:
                    with suppress(Exception):  # the error that stopped sending is the one told
                        ledger.settle()  # the answers before it, kept at once
                    raise
            # The last of the settling and the outputs are short and must be whole: a Ctrl-C
            # or SIGTERM meanwhile waits for them, then the run ends as it was going to. One
            # landing just before the wait began cut nothing: the block runs again.
            result = None
            while result is None:
                with suppress(KeyboardInterrupt), deferred():
                    if sent:
                        ledger.settle()
                        sent = False
                    result = self._account(ledger, sources, base_url, stats, started)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _unmet(self, ledger: Ledger, sources: list[Source]) -> list[FailedEntry]:
        """`retry`: the entries it lists again, from what the ledger staged."""
        if self.selection is None:
            return []
        selection = self.selection
        index = {s.path: i for i, s in enumerate(sources)}
        wanted_lines = [  # a message is met by its sourceUuid; a reject by its line, too
            (index[p], n, selection.created.get(id(entry)))
            for (p, n), entry in selection.lines.items()
            if p in index
        ]
        # Carried messages too: read again all the same (a source read on from a line),
        # they are the ledger's to list.
        carried = (e.sourceUuid for e in selection.carried if e.sourceUuid)
        uuids, lines = ledger.staged_among([*selection.uuids, *carried], wanted_lines)
        broken = {(sources[i].path, n) for i, n in ledger.broken_lines()}
        return selection.unmet(
            uuids,
            {(sources[i].path, n): uuid for (i, n), uuid in lines.items()},
            broken,
            read_whole=self.read_whole,
        )

    def _shards(self, sources: list[Source]) -> dict[int, str]:
        """By source index, the shard whose rows alone were read of it (K/N): this run's
        --shard, or, for a retry without one, the shard of the entries it read on from
        (one shard's alone); an UNREADABLE entry records it."""
        shard = self.config.shard
        if shard is not None:
            return dict.fromkeys(range(len(sources)), f"{shard[0]}/{shard[1]}")
        if self.selection is None:
            return {}
        out = {}
        for i, source in enumerate(sources):
            found = {e.shard for e in self.selection.read_on if e.source == source.path}
            if len(found) == 1 and None not in found:
                out[i] = str(found.pop())
        return out

    def _unread(self, ledger: Ledger, sources: list[Source]) -> list[FailedEntry]:
        """`load` stopped while reading: an entry for where each source's unstaged rest
        begins (after its last row staged: a source's rows are staged in order, and the
        last batch handed on may not have been), which `retry` reads on from. Without it,
        those rows would stand in no failed file, and a retry would find nothing left."""
        if self.read_whole or self.selection is not None or self.config.dry_run:
            return []
        reached = ledger.last_lines()
        shards = self._shards(sources)
        unread = []
        for index, source in enumerate(sources):
            staged = reached.get(index, 0)
            if index in self.read_through and self.yielded.get(index, 0) <= staged:
                continue
            error = {
                "errorCode": NOT_READ,
                "errorDescription": "the run was stopped before this line was read: retry "
                "reads this source again (or run the same command again)",
            }
            unread.append(
                FailedEntry(
                    source=source.path,
                    line=staged + 1,
                    stage="notSent",
                    retryable=True,
                    errors=[error],
                    shard=shards.get(index),
                )
            )
        return unread

    def _check_unchanged(self, ledger: Ledger, sources: list[Source], command: str) -> None:
        """Resuming a load over a source whose content changed would mix two imports."""
        if command != "load" or self.config.fresh or self.config.dry_run:
            return
        changed = ledger.changed_sources(
            (s.path, _realpath(s), s.sha256) for s in sources if not s.is_stdin
        )
        if changed:
            ledger.finish_run("usage", {})
            raise UsageError(
                f"{', '.join(changed)}: changed since the last run with this state dir read it",
                hint="pass --fresh to import it as a new run (messages the platform accepted "
                "are still never sent again), or use another --state-dir",
            )

    def _target(self, stack: ExitStack) -> str | None:
        config = self.config
        if config.dry_run:
            return config.base_url
        if config.sandbox:
            from .sandbox import SandboxConfig, start_sandbox

            running = start_sandbox(SandboxConfig(port=0))
            stack.callback(running.stop)
            return running.base_url
        if config.base_url is None:
            raise UsageError(
                "no --base-url given", hint="pass --base-url, set HISTIMPORT_BASE_URL, or --sandbox"
            )
        return check_base_url(config.base_url, allow_insecure_http=config.allow_insecure_http)

    def _stage(self, ledger: Ledger, rows: Iterator[Valid | Rejected]) -> None:
        try:
            with sigterm_as_interrupt(), _fewer_collections():
                ledger.stage(rows)
        except KeyboardInterrupt:
            self.interrupted = True
            self.read_whole = False

    def _first_contact(
        self, ledger: Ledger, deliverer: Deliverer, rows: Iterator[Valid | Rejected]
    ) -> Iterator[Valid | Rejected]:
        """The rows, once the first valid one was sent alone, before anything else is read:
        a wrong password, base URL, certificate or proxy is told within a second, not once a
        large export was read. Refused for good (401, 403, TLS) or unreachable, reading
        stops there: the failed file says where each source's rest begins, and the same
        command goes on from there later."""
        carry_refused = not (self.include_permanent or self.config.fresh)
        rejected: set[str] = set()  # a valid row repeating one of these is rejected too
        for row in rows:
            if isinstance(row, Rejected) and row.source_uuid is not None:
                rejected.add(row.source_uuid)
            if (
                isinstance(row, Valid)
                and row.source_uuid not in rejected
                and not ledger.known(row.source_uuid, refused_too=carry_refused)
            ):
                if not self._sent_first(ledger, deliverer, row):
                    deliverer.stop()
                    self.read_whole = False
                    self.read -= 1  # read, but not staged: the same command reads it again
                    return
                yield row
                break
            yield row
        yield from rows

    def _checked(self, sources: list[Source]) -> Iterator[Valid | Rejected]:
        """Read -> map -> validate, every source in turn, counting what is read."""
        config = self.config
        mapping = Mapping.load(config.map_file) if config.map_file is not None else None
        max_body = config.max_request_bytes - Envelope(config.callback_url).overhead
        now = normalise_timestamp(datetime.now(UTC).isoformat())
        check = partial(
            check_row, notify=config.notify, strict=config.strict, now=now, max_body=max_body
        )
        yielded = self.yielded
        for index, source in enumerate(sources):
            self.observer.staging(source.path)
            source.map = str(config.map_file) if config.map_file is not None else None
            mapper = Mapper(
                source.format,
                mapping,
                source.path,
                generate_source_uuid=config.generate_source_uuid,
            )
            total = None if source.is_stdin else _file_size(source.path)
            with open_source(source) as stream:
                for n, checked in enumerate(
                    self._checked_rows(source, stream, index, mapper, check), 1
                ):
                    if not n % _READING_EVERY:
                        self.observer.reading(source.size, total)
                    if not self._owns(checked):
                        continue
                    self.read += 1
                    yielded[index] = checked.line
                    if isinstance(checked, Valid) and checked.warnings:
                        self._warn(source.path, checked)
                    yield checked
                self.read_through.add(index)
                # Drain, so that size and sha256 cover the whole source (what can be read
                # of a damaged one: its last row already says where reading stopped).
                with suppress(*READ_ERRORS):
                    while stream.read(1 << 20):
                        pass
            self.observer.reading(source.size, total)

    def _checked_rows(
        self,
        source: Source,
        stream: IO[bytes],
        index: int,
        mapper: Mapper,
        check: Callable[[RawRow], Valid | Rejected],
    ) -> Iterator[Valid | Rejected]:
        workers = self._check_workers(source)
        if workers:
            lines = jsonl_lines(
                stream, index, max_line_bytes=self.config.max_line_bytes, name=source.path
            )
            yield from _checked_in_workers(
                lines, index, mapper, check, workers, warm_up=self.config.check_workers is None
            )
            return
        for raw in self._rows(source, stream, index):
            row = mapper(raw)
            if row is None:
                continue
            if self.selection is not None and not self.selection.wants(source.path, row):
                continue
            yield check(row)

    def _check_workers(self, source: Source) -> int:
        """Worker processes checking this source's rows: JSONL only, not for `retry`'s
        selection, and by default one per CPU (at most four) when there are several and the
        process runs no other thread (`--sandbox` does): a forked child could find a lock
        held by a thread that does not exist in it."""
        if source.format != "jsonl" or self.selection is not None:
            return 0
        if self.config.check_workers is not None:
            return self.config.check_workers
        if threading.active_count() > 1:
            return 0
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        return min(cpus, MAX_CHECK_WORKERS) if cpus > 1 else 0

    def _owns(self, row: Valid | Rejected) -> bool:
        """With --shard K/N, a row is this shard's when its key hashes to K; a row whose ids
        could not be read is shard 0's, so that every rejected row is reported once (all
        but one)."""
        shard = self.config.shard
        if shard is None:
            return True
        if row.department is None or row.customer is None:
            # The row for the rest of a source that breaks off is every shard's: each one
            # read no further, and a retry of each shard's failed file reads on from there.
            return shard[0] == 0 or (isinstance(row, Rejected) and _broke_off(row))
        return shard_of(row.department, row.customer, shard[1]) == shard[0]

    def _rows(self, source: Source, stream: IO[bytes], index: int) -> Iterator[RawRow]:
        config = self.config
        if source.format == "csv":
            return read_csv(
                stream,
                index,
                max_line_bytes=config.max_line_bytes,
                delimiter=config.delimiter,
                encoding=config.encoding,
                name=source.path,
            )
        return read_jsonl(stream, index, max_line_bytes=config.max_line_bytes, name=source.path)

    def _sent_first(self, ledger: Ledger, deliverer: Deliverer, row: Valid) -> bool:
        """Send the first valid row alone; whether the run may go on. Its outcome, if the
        answer gave one, is kept: staged, the message is this run's, not sent again."""
        message = Pending(0, row.source_uuid, row.body)
        outcome = asyncio.run(deliverer.first_contact(row.department, row.customer, message))
        if deliverer.stopping:
            return False
        if outcome is not None:
            self.first_outcome = outcome
            ledger.remember(outcome)
        return True

    def _warn(self, path: str, row: Valid) -> None:
        for warning in row.warnings or ():
            self.warning_count += 1
            if len(self.warnings) < WARNINGS_KEPT:
                self.warnings.append(
                    {
                        "source": path,
                        "line": row.line,
                        "sourceUuid": row.source_uuid,
                        "warningCode": warning.code,
                        "warningDescription": warning.description,
                    }
                )

    def _deliverer(self, ledger: Ledger, base_url: str) -> Deliverer:
        config = self.config
        credentials = None
        if config.username is not None or config.password is not None:
            credentials = (config.username or "", config.password or "")
        return Deliverer(
            config=config,
            ledger=ledger,
            base_url=base_url,
            credentials=credentials,
            progress=self.observer.progress,
            paused=self.observer.paused,
        )

    def _deliver(self, ledger: Ledger, deliverer: Deliverer) -> None:
        """Send what the ledger holds; the deliverer's stats are kept up to date as it goes,
        so that they hold whatever stops it."""
        self.observer.sending(ledger.to_send())

        async def main() -> None:
            restore = install_async_signals(deliverer.stop, self._mark_interrupted, deliverer.hurry)
            try:
                await deliverer.run()
            finally:
                restore()

        with ledger.settling():
            asyncio.run(main())
        self.observer.done()

    def _mark_interrupted(self) -> None:
        self.interrupted = True

    def _account(
        self,
        ledger: Ledger,
        sources: list[Source],
        base_url: str | None,
        stats: DeliveryStats | None,
        started: float,
    ) -> RunResult:
        config = self.config
        delivered = stats or DeliveryStats()
        counts = {"read": self.read, **ledger.counts()}
        parts = sum(v for k, v in counts.items() if k != "read")
        if parts != counts["read"]:
            raise InvariantError(
                f"the counts do not add up: read {counts['read']} but accounted for {parts}",
                hint="please report this with the command you ran",
            )
        error_codes: Counter[str] = Counter()
        preview: list[str] = []
        if delivered.gave_up:
            error = {"errorCode": "PLATFORM_UNAVAILABLE", "errorDescription": delivered.gave_up}
            ledger.describe_unsent((error,))
        carried = self._unmet(ledger, sources) + self._unread(ledger, sources)
        with writing(config.failed_out, "--failed-out"):
            write_failed(
                config.failed_out,
                base_url=base_url,
                sources=sources,
                counts={**counts, "notSent": 0} if config.dry_run else counts,
                failures=ledger.failures(rejected_only=config.dry_run),
                error_codes=error_codes,
                preview=preview,
                carried=carried,
                shards=self._shards(sources),
            )
        elapsed = time.monotonic() - started
        report: dict[str, Any] = {
            "format": REPORT_FORMAT,
            **counts,
            "warnings": self.warning_count + delivered.server_warnings,
            "requests": delivered.requests,
            "retries": delivered.retries,
            "unknownOutcomes": delivered.unknown_outcomes,
            "splits": delivered.splits,
            "reconnects": delivered.reconnects,
            "statusCodes": dict(sorted(delivered.statuses.items())),
            "finalConcurrency": delivered.final_concurrency,
            "pacing": {
                "rate": _rounded(delivered.pace.rate),
                "limitEstimate": _rounded(delivered.pace.limit),
                "peakRate": _rounded(delivered.peak_rate),
                "pushBacks": dict(delivered.push_backs.most_common()),
                "pausedSeconds": round(delivered.paused_seconds, 3),
            },
            "gaveUp": delivered.gave_up,
            "elapsedSeconds": round(elapsed, 3),
            "messagesPerSecond": round(counts["accepted"] / elapsed, 1) if elapsed > 0 else 0.0,
            "errorCodes": dict(error_codes.most_common()),
        }
        if config.report is not None:
            with writing(config.report, "--report"):
                write_report(config.report, report)
        plan = []
        if config.dry_run:
            plan = [
                {"departmentUUID": d, "customerUUID": c, "messages": n, "requests": r}
                for d, c, n, r in ledger.plan(config.chunk_size)
            ]
        message = None
        if delivered.aborted:
            status = ExitStatus.ABORTED
            message = f"{delivered.aborted}: nothing more was sent"
        elif delivered.gave_up:
            status = ExitStatus.INCOMPLETE
            message = (
                f"{delivered.gave_up}. Nothing more was sent; {counts['notSent']} messages are "
                "listed as notSent: run the same command again to go on"
            )
        elif self.interrupted and not self.read_whole:
            status = ExitStatus.INTERRUPTED
            message = f"interrupted while reading, after {self.read} rows: nothing was sent"
            if stats is not None and stats.requests:
                message = (
                    f"interrupted while reading, after {self.read} rows: only the first "
                    "message was sent, alone, to check the platform"
                )
            if config.dry_run:
                message = f"interrupted while reading, after {self.read} rows"
            elif self.selection is None:
                message += (
                    "; the failed file says where the rows not read begin: run the same "
                    "command again, or retry the failed file, to go on"
                )
            else:
                message += "; the new failed file lists again what the failed files listed"
        elif self.interrupted:
            status = ExitStatus.INTERRUPTED
            message = "interrupted: requests in flight were settled; the rest is listed as notSent"
            if delivered.abandoned:
                message = (
                    "interrupted twice: requests in flight were abandoned; their messages and "
                    "the rest are listed as notSent (the platform may have stored the "
                    "abandoned ones: sent again, it knows them by sourceUuid)"
                )
        elif counts["rejected"] or (not config.dry_run and counts["failed"] + counts["notSent"]):
            status = ExitStatus.INCOMPLETE
        elif carried:
            # retry: every row read was accepted, but the new failed file lists again what
            # was not sent (refused for good, or no longer in the sources): not done yet.
            status = ExitStatus.INCOMPLETE
            message = (
                f"the failed file lists again {len(carried)} entries this run did not send: "
                "refused for good (--include-permanent sends them again) or not found in "
                "the sources"
            )
        else:
            status = ExitStatus.OK
        ledger.finish_run(status.name.lower(), report)
        return RunResult(
            status,
            counts,
            report,
            config.failed_out,
            preview,
            plan=plan,
            warnings=self.warnings,
            message=message,
        )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
