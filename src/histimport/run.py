"""The library API: `load`, `retry` and `validate`, one pipeline: read and check
(`intake`) -> record (`staging`, `ledger`) -> chunk (`chunking`) -> deliver (`deliver`),
reading and sending at once (`stream`) -> account and write the outputs (`accounting`).
Nothing here knows of the command line."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .accounting import Ending, RunResult, account
from .check import Rejected, Valid
from .chunking import Chunker, Spill
from .config import Config
from .deliver import Deliverer, Lanes, Pause
from .errors import UsageError
from .intake import Intake, open_sources, realpath
from .ledger import Ledger
from .outputs import check_not_anothers, check_outputs, owner
from .read import Source
from .records import Outcome, Pending
from .signals import deferred, install_async_signals, sigterm_as_interrupt
from .staging import Staging
from .stream import HANDOFF_BYTES, Handoff, Reader
from .target import check_base_url

if TYPE_CHECKING:
    from .matching import Selection

HEAD_ROWS = 4096
"""Rows read before the first message to send that are held at most, then recorded."""


class Observer(Protocol):
    """Hooks for a progress display; every method is optional to act on. They are called
    from the thread that runs the command."""

    def starting(self, details: dict[str, Any]) -> None: ...
    def delivering(self, live: Callable[[], dict[str, Any]]) -> None: ...
    def notice(self, event: str, level: int, fields: dict[str, Any]) -> None: ...
    def staging(self, source: str) -> None: ...
    def reading(self, done: int, total: int | None) -> None: ...
    def sending(self, messages: int) -> None: ...
    def progress(self, accepted: int, failed: int) -> None: ...
    def paused(self, pause: Pause) -> None: ...
    def done(self) -> None: ...


class Silent:
    """An observer that acts on nothing: subclass it to act on some events only."""

    def starting(self, details: dict[str, Any]) -> None:
        """The run begins: its command, sources, target and settings."""

    def delivering(self, live: Callable[[], dict[str, Any]]) -> None:
        """Sending begins; `live()` gives the delivery's figures (requests, pace)."""

    def notice(self, event: str, level: int, fields: dict[str, Any]) -> None:
        """The delivery retried a request, or gave up on one or on the platform."""

    def staging(self, source: str) -> None:
        pass

    def reading(self, done: int, total: int | None) -> None:
        pass

    def sending(self, messages: int) -> None:
        """`messages` more were read and handed on to be sent."""

    def progress(self, accepted: int, failed: int) -> None:
        pass

    def paused(self, pause: Pause) -> None:
        pass

    def done(self) -> None:
        pass


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
    """Reading allocates millions of short-lived, acyclic objects: run the cycle collector
    less often meanwhile (it still runs), and leave what was imported before out of it."""
    gc.freeze()
    previous = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


def _fingerprint(path: str) -> str:
    """The sha256 of a file as `Source.sha256` has it (of its bytes, gzip or not)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


class _Relay:
    """An observer's reading events, from the reader's thread to the event loop's."""

    def __init__(self, observer: Observer, loop: asyncio.AbstractEventLoop) -> None:
        self._observer = observer
        self._loop = loop

    def staging(self, source: str) -> None:
        self._call(self._observer.staging, source)

    def reading(self, done: int, total: int | None) -> None:
        self._call(self._observer.reading, done, total)

    def sending(self, messages: int) -> None:
        self._call(self._observer.sending, messages)

    def _call(self, function: Any, *args: Any) -> None:
        with suppress(RuntimeError):  # the loop is closed: the run is ending
            self._loop.call_soon_threadsafe(function, *args)


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
        self.read_whole = False  # every row of the sources was read and recorded
        self.sent = False  # delivery ran: its journal is to be settled
        self.intake: Intake | None = None

    def execute(
        self, paths: list[str], command: str, formats: dict[str, str] | None = None
    ) -> RunResult:
        config = self.config
        sources = open_sources(paths, config.format, formats)
        outputs = {"--failed-out": config.failed_out}
        if config.report is not None:
            outputs["--report"] = config.report
        if config.accepted_out is not None:
            outputs["--accepted-out"] = config.accepted_out
        check_outputs(outputs, sources)
        mine = owner(*(("validate", None) if config.dry_run else (command, config.state_dir)))
        if config.out_dir is None:
            check_not_anothers(config.failed_out, mine)
        started = time.monotonic()
        # Forked checkers are safe while no thread but ours runs (`--sandbox` runs one).
        forks = threading.active_count() == 1
        with ExitStack() as stack:
            # SIGTERM interrupts as Ctrl-C does, instead of killing the process outright.
            stack.enter_context(sigterm_as_interrupt())
            stack.callback(self.observer.done)  # whatever ends the run, progress events stop
            base_url = self._target(stack)
            state_dir = config.state_dir
            if config.dry_run:
                state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            ledger = Ledger(state_dir)
            stack.callback(ledger.close)
            ledger.begin_run(command, base_url or "")
            intake = self.intake = Intake(
                config,
                sources,
                self.selection,
                forks=forks,
                on_source=self.observer.staging,
                on_read=self.observer.reading,
            )
            deliverer = None
            try:
                if config.out_dir is not None:
                    config = self.config = self._in_out_dir(config, ledger.run_id, sources)
                self.observer.starting(self._details(command, sources, base_url))
                if not config.dry_run:
                    assert base_url is not None
                    # Made before anything is read: a --ca-bundle or a proxy setting that
                    # cannot be used is told at once.
                    deliverer = self._deliverer(ledger, base_url)
                    self.observer.delivering(deliverer.live)
                self._check_unchanged(ledger, sources, command)
                with _fewer_collections():
                    self._stream(ledger, state_dir, sources, intake, deliverer)
            except UsageError:  # or a source found unreadable as a whole: nothing is sent
                ledger.finish_run("usage", {})
                raise
            except BaseException:
                if self.sent:
                    with suppress(Exception):  # the error that stopped sending is the one told
                        ledger.settle()  # the answers before it, kept at once
                raise
            if self.read_whole:  # a source read in part has no size nor checksum to keep
                ledger.record_sources(
                    (i, s.path, s.format, s.size, s.sha256, realpath(s))
                    for i, s in enumerate(sources)
                )
            # The last of the settling and the outputs are short and must be whole: a Ctrl-C
            # or SIGTERM meanwhile waits for them, then the run ends as it was going to. One
            # landing just before the wait began cut nothing: the block runs again.
            stats = deliverer.stats if deliverer is not None else None
            result = None
            while result is None:
                with suppress(KeyboardInterrupt), deferred():
                    if self.sent:
                        ledger.settle()
                        self.sent = False
                    if config.fresh and self.read_whole and not self.interrupted:
                        # Only once every row was read: a --fresh run stopped before that
                        # leaves them for the next run.
                        ledger.forget_refusals()
                    assert self.intake is not None
                    ending = Ending(
                        config=config,
                        sources=sources,
                        base_url=base_url,
                        intake=self.intake,
                        selection=self.selection,
                        read=self.read,
                        interrupted=self.interrupted,
                        read_whole=self.read_whole,
                        stats=stats,
                        started=started,
                        owner=mine,
                        include_permanent=self.include_permanent,
                    )
                    result = account(ledger, ending)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _stream(
        self,
        ledger: Ledger,
        state_dir: Path,
        sources: list[Source],
        intake: Intake,
        deliverer: Deliverer | None,
    ) -> None:
        """Read, record and send at once; the first message alone, before the rest."""
        carry_refused = not (self.include_permanent or self.config.fresh)
        rows = intake.rows()
        head: list[Valid | Rejected] = []
        staging = Staging(
            state_dir,
            run_id=ledger.run_id,
            target=ledger.target,
            paths=[s.path for s in sources],
            carry_refused=carry_refused,
        )
        try:
            if deliverer is not None and self.config.shard is None:
                # Not a shard: the shards' failed files are retried together, in a state dir
                # that knows none of their first messages.
                try:
                    first = self._first_contact(
                        ledger, deliverer, rows, head, carry_refused, staging
                    )
                except KeyboardInterrupt:
                    self.interrupted = True
                    return
                if first is not None:
                    staging.first_sent(first)
            if deliverer is None or deliverer.stopping:
                # Dry run; or the first message was refused for good, or went nowhere: what
                # was read before it is recorded, the rest read again by the next run.
                reader = Reader(
                    iter(head) if deliverer else itertools.chain(head, rows), staging, None
                )
                try:
                    reader.read()
                except KeyboardInterrupt:
                    self.interrupted = True
                self.read_whole = reader.completed and deliverer is None
                return
            self._send_while_reading(
                ledger, state_dir, deliverer, staging, itertools.chain(head, rows)
            )
        finally:
            self.read = staging.rows
            staging.close()

    def _first_contact(
        self,
        ledger: Ledger,
        deliverer: Deliverer,
        rows: Iterator[Valid | Rejected],
        head: list[Valid | Rejected],
        carry_refused: bool,
        staging: Staging,
    ) -> Outcome | None:
        """Read up to the first message to send and send it alone, before anything else
        is read: a wrong password, base URL, certificate or proxy is told within a second.
        The rows read before it, none of which is to be sent, are recorded a batch at a time
        (a resumed run may pass millions); the last of them are left in `head` (the message
        last), to be recorded; refused for good (401, 403, TLS) or unreachable, the message
        is taken out of it: the failed file says where each source's rest begins, and the
        same command goes on from there."""
        rejected: set[str] = set()  # a valid row repeating one of these is rejected too
        for row in rows:
            if len(head) >= HEAD_ROWS:
                staging.admit(head)
                head.clear()
            head.append(row)
            if isinstance(row, Rejected):
                if row.source_uuid is not None:
                    rejected.add(row.source_uuid)
                continue
            if row.source_uuid in rejected or ledger.known(
                row.source_uuid, refused_too=carry_refused
            ):
                continue
            outcome = self._sent_first(ledger, deliverer, row)
            if deliverer.stopping:
                head.pop()  # read, but not recorded: the same command reads it again
            return outcome
        return None

    def _send_while_reading(
        self,
        ledger: Ledger,
        state_dir: Path,
        deliverer: Deliverer,
        staging: Staging,
        rows: Iterator[Valid | Rejected],
    ) -> None:
        """Deliver in the event loop while a thread reads, records and chunks."""
        config = self.config
        observer = self.observer
        lanes = Lanes(ordered=not config.unordered)
        spill = Spill(state_dir)
        reader: Reader | None = None
        thread: threading.Thread | None = None
        handoff: Handoff | None = None

        def stop() -> None:
            deliverer.stop()
            if handoff is not None:
                handoff.stop()
            if reader is not None:
                reader.halt()

        def hurry() -> None:
            stop()
            deliverer.hurry()

        async def main() -> None:
            nonlocal reader, thread, handoff
            loop = asyncio.get_running_loop()
            handoff = Handoff(loop, lanes, HANDOFF_BYTES)
            relay = _Relay(observer, loop)
            assert self.intake is not None
            self.intake.on_source = relay.staging
            self.intake.on_read = relay.reading
            chunker = Chunker(
                handoff.put,
                chunk_size=config.chunk_size,
                max_bytes=lambda: deliverer.max_bytes,
                envelope=deliverer.envelope,
                spill=spill,
            )
            reader = Reader(rows, staging, chunker, handed_on=relay.sending)

            def read() -> None:
                assert reader is not None and handoff is not None
                try:
                    reader.run()
                finally:
                    if reader.error is not None:
                        handoff.stop()
                        with suppress(RuntimeError):
                            loop.call_soon_threadsafe(deliverer.stop)
                    handoff.close()

            restore = install_async_signals(stop, self._mark_interrupted, hurry)
            thread = threading.Thread(target=read, name="histimport-read", daemon=True)
            thread.start()
            try:
                await deliverer.run(lanes)
            finally:
                stop()
                while thread.is_alive():
                    await asyncio.sleep(0.01)
                restore()

        self.sent = True
        try:
            with ledger.settling():
                asyncio.run(main())
        except KeyboardInterrupt:
            # Just before sending began or just after it ended: while it runs, its own
            # handlers stop it and settle what is in flight.
            self.interrupted = True
            stop()
        finally:
            if thread is not None:
                thread.join()
            spill.close()
        observer.done()
        assert reader is not None
        if reader.error is not None:
            raise reader.error
        self.read_whole = reader.completed

    def _check_unchanged(self, ledger: Ledger, sources: list[Source], command: str) -> None:
        """Resuming a load over a source whose content changed would mix two imports: a
        source an earlier load read is fingerprinted before anything is sent."""
        if command != "load" or self.config.fresh or self.config.dry_run:
            return
        resumed = [
            (s.path, path, _fingerprint(s.path))
            for s in sources
            if (path := realpath(s)) is not None and ledger.read_before((path,))
        ]
        changed = ledger.changed_sources(resumed)
        if changed:
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

    @staticmethod
    def _in_out_dir(config: Config, run_id: int, sources: list[Source]) -> Config:
        """The run's outputs in a folder of their own under --out-dir, named by the time
        and the run: failed.json, report.json, accepted.jsonl."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        assert config.out_dir is not None
        name = f"{stamp}-run{run_id}"
        for n in itertools.count(2):
            # Another ledger's run (a shard, a check) may have the same id in the same second.
            folder = config.out_dir / name
            try:
                folder.mkdir(parents=True)
                break
            except FileExistsError:
                name = f"{stamp}-run{run_id}-{n}"
            except OSError as exc:
                raise UsageError(
                    f"--out-dir {config.out_dir}: cannot make {folder}: {exc.strerror or exc}"
                ) from exc
        outputs = {"--failed-out": folder / "failed.json", "--report": folder / "report.json"}
        check_outputs(outputs, sources)
        return replace(
            config,
            failed_out=outputs["--failed-out"],
            report=outputs["--report"],
            accepted_out=None if config.dry_run else folder / "accepted.jsonl",
        )

    def _details(self, command: str, sources: list[Source], base_url: str | None) -> dict[str, Any]:
        """What a start event tells: enough to know, reading the logs later, what ran."""
        config = self.config
        return {
            "command": command,
            "version": __version__,
            "sources": [s.path for s in sources],
            "target": base_url,
            "stateDir": str(config.state_dir),
            "dryRun": config.dry_run,
            "chunkSize": config.chunk_size,
            "concurrency": config.concurrency,
            "rate": config.rate,
            "ordered": not config.unordered,
            "shard": None if config.shard is None else "/".join(map(str, config.shard)),
            "failedOut": str(config.failed_out),
        }

    def _sent_first(self, ledger: Ledger, deliverer: Deliverer, row: Valid) -> Outcome | None:
        """Send the first valid row alone. Its outcome, if the answer gave one, is kept:
        recorded, the message is this run's, not sent again (`deliverer.stopping`: the run
        may not go on)."""
        message = Pending(0, row.source_uuid, row.body)
        outcome = asyncio.run(deliverer.first_contact(row.department, row.customer, message))
        if deliverer.stopping:
            return None
        if outcome is not None:
            ledger.remember(outcome, row.department, row.customer)
        return outcome

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
            noticed=self.observer.notice,
        )

    def _mark_interrupted(self) -> None:
        self.interrupted = True
