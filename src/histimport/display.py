"""What a person sees: a progress bar on a TTY, a summary at the end, error lines.

Everything goes to stderr, so that stdout stays free for machine output (`validate
--output json`). Nothing is animated off a TTY or with --quiet. Off a TTY, or with
`--log-format json`, the run's events are logged instead (`logs`): its start, a progress
event every --progress-interval seconds, each pause and each give-up as it happens, the
summary. rich is imported only for what is shown with it: a quiet run does without it
(about 40 ms of start-up).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import logs
from .accounting import RunResult

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from .deliver import Pause

_WARNINGS_SHOWN = 10
_VALIDATION = (
    ("read", "read"),
    ("rejected", "rejected"),
    ("notSent", "valid"),
    ("alreadyAccepted", "already accepted"),
    ("warnings", "warnings"),
)
_SUMMARY = (
    ("read", "read"),
    ("rejected", "rejected"),
    ("alreadyAccepted", "already accepted"),
    ("accepted", "accepted"),
    ("failed", "failed"),
    ("notSent", "not sent"),
    ("warnings", "warnings"),
    ("requests", "requests"),
    ("retries", "retries"),
    ("elapsedSeconds", "elapsed (s)"),
    ("messagesPerSecond", "messages/s"),
)


class Display:
    """Progress and summary for one command; also the run's Observer."""

    def __init__(self, *, quiet: bool, log_format: str, progress_interval: float = 10.0) -> None:
        self.quiet = quiet
        self.json = log_format == "json"
        self.animate = not quiet and not self.json and self.console.is_terminal
        # Logged: everything in JSON, or in text off a terminal; only errors when quiet.
        self.logged = self.json or not (quiet or self.console.is_terminal)
        if self.logged:
            level = logging.ERROR if quiet else logging.INFO
            logs.configure("json" if self.json else "text", level=level)
        self._interval = progress_interval
        self._ticker: threading.Thread | None = None
        self._stop_ticking = threading.Event()
        self._live: Callable[[], dict[str, Any]] | None = None
        self._started_at = time.monotonic()
        self._last: tuple[float, int] = (self._started_at, 0)  # (when, accepted) last told
        self._accepted = 0
        self._bytes: tuple[int, int | None] = (0, None)
        self._last_pause: str | None = None
        self._sources = 0  # sources begun: the ETA is told from the first one's bytes alone
        self._progress: Progress | None = None
        self._read: Any = None  # the progress display's tasks
        self._sent: Any = None
        self._source = ""
        self._handed_on = 0
        self._failed = 0
        self._pace = ""

    @functools.cached_property
    def console(self) -> Console:
        from rich.console import Console

        return Console(stderr=True, highlight=False)

    # -- Observer ------------------------------------------------------------------------

    def starting(self, details: dict[str, Any]) -> None:
        """The run begins: what it reads, where it sends, the settings that matter."""
        self._started_at = time.monotonic()
        self._last = (self._started_at, 0)
        self.event("start", **details)

    def delivering(self, live: Callable[[], dict[str, Any]]) -> None:
        """Sending begins; `live()` tells the delivery's figures at any time. A progress
        event is logged every --progress-interval seconds until `done`."""
        self._live = live
        if self.logged and not self.quiet and self._ticker is None:
            self._ticker = threading.Thread(
                target=self._tick, name="histimport-progress", daemon=True
            )
            self._ticker.start()

    def notice(self, event: str, level: int, fields: dict[str, Any]) -> None:
        """Something the delivery did that a reader of the logs wants to know at once (a
        retry, a give-up)."""
        self.event(event, level=level, **fields)

    def staging(self, source: str) -> None:
        self.event("reading", source=source)
        self._source = source
        self._sources += 1
        self.reading(0, None)

    def reading(self, done: int, total: int | None) -> None:
        """Bytes of the current source read so far (compressed bytes for gzip)."""
        self._bytes = (done, total)
        progress = self._started()
        if progress is None:
            return
        amount = f"{done / 1e6:.1f}" + ("" if total is None else f"/{total / 1e6:.1f}") + " MB"
        progress.update(
            self._read,
            description=f"reading {self._source}",
            completed=done,
            total=total,
            amount=amount,
        )

    def sending(self, messages: int) -> None:
        """`messages` more were read and handed on to be sent."""
        if not self._handed_on:
            self.event("sending", messages=messages)
        self._handed_on += messages
        self._show_sent()

    def progress(self, accepted: int, failed: int) -> None:
        self._accepted += accepted
        self._failed += failed
        self._show_sent()

    def paused(self, pause: Pause) -> None:
        """A request the platform pushed back: its cause, its wait and the new pace."""
        rate = None if pause.rate is None else round(pause.rate, 1)
        self.event(
            "pause",
            level=logging.WARNING,
            cause=pause.cause,
            waitSeconds=round(pause.wait, 3),
            rate=rate,
        )
        paced = "unpaced" if rate is None else f"paced at {rate:g} req/s"
        self._pace = f"{paced} (last push-back: {pause.cause})"
        self._last_pause = pause.cause
        self._show_sent()

    def done(self) -> None:
        if self._ticker is not None:
            self._stop_ticking.set()
            self._ticker.join()
            self._ticker = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _tick(self) -> None:
        while not self._stop_ticking.wait(self._interval):
            self.event("progress", **self.figures())

    def figures(self) -> dict[str, Any]:
        """The run's progress now: what was answered, what waits, the pace, the ETA."""
        now = time.monotonic()
        since, before = self._last
        accepted, answered = self._accepted, self._accepted + self._failed
        rate = (accepted - before) / (now - since) if now > since else 0.0
        self._last = (now, accepted)
        live = self._live() if self._live is not None else {}
        waiting = self._handed_on - answered
        done, total = self._bytes
        eta = None
        if self._sources > 1:
            total = None  # the current source's share read says nothing of the rest
        if rate > 0 and total:
            # Messages to come, estimated from the share of the source read so far.
            expected = self._handed_on * total / max(done, 1)
            eta = round(max(expected - answered, waiting) / rate)
        figures = {
            "elapsedSeconds": round(now - self._started_at, 1),
            "accepted": accepted,
            "failed": self._failed,
            "waiting": waiting,
            **live,
            "messagesPerSecond": round(rate, 1),
            "pushedBack": self._last_pause,
            "etaSeconds": eta,
        }
        if total:
            figures["readPercent"] = round(100 * done / total, 1)
        self._last_pause = None
        return figures

    def _show_sent(self) -> None:
        progress = self._started()
        if progress is None:
            return
        failed = f"{self._failed} failed  " if self._failed else ""
        answered = self._accepted + self._failed
        progress.update(
            self._sent,
            completed=answered,
            total=self._handed_on,
            amount=f"{answered}/{self._handed_on}",
            note=failed + self._pace,
            visible=True,
        )

    def _started(self) -> Progress | None:
        """The progress display, started at its first use: a line for the source being
        read, one for the messages answered of those read; None when not animated."""
        if not self.animate:
            return None
        if self._progress is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                TextColumn("{task.fields[amount]}", markup=False),
                TimeElapsedColumn(),
                TextColumn("{task.fields[note]}", markup=False),
                console=self.console,
                transient=True,
            )
            self._read = self._progress.add_task("reading", total=None, amount="", note="")
            self._sent = self._progress.add_task("sent", total=0, amount="", note="", visible=False)
            self._progress.start()
        return self._progress

    # -- messages ------------------------------------------------------------------------

    def event(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        if self.logged:
            logs.event(event, level, **fields)

    def error(self, message: str, hint: str | None = None) -> None:
        if self.json:
            self.event("error", logging.ERROR, message=message, hint=hint)
            return
        self.console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
        if hint:
            self.console.print(f"  hint: {hint}", markup=False, soft_wrap=True)

    def summary(self, result: RunResult, *, title: str) -> None:
        self.done()
        if self.json:
            for line in result.preview:
                self.event("problem", logging.WARNING, text=line)
            if result.message:
                self.error(result.message)
            self.event(
                "summary",
                exitStatus=int(result.exit_status),
                failedFile=None if result.failed_path is None else str(result.failed_path),
                **result.report,
            )
            return
        if self.quiet:
            if result.message:
                self.error(result.message)
            return
        report = result.report
        for line in result.preview:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        shown = len(result.preview)
        listed = report["rejected"] + report["failed"]
        if listed > shown:
            where = result.failed_path or "validate --failed-out PATH"
            self.console.print(f"... {listed - shown} more: see {where}", markup=False)
        for w in result.warnings[:_WARNINGS_SHOWN]:
            self.console.print(
                f"{w['source']}:{w['line']}: warning: {w['warningDescription']}",
                markup=False,
                soft_wrap=True,
            )
        if len(result.warnings) > _WARNINGS_SHOWN:
            more = report["warnings"] - _WARNINGS_SHOWN
            self.console.print(f"... {more} more warnings (validate --output json)", markup=False)
        for note in result.notes:
            self.console.print(note, markup=False, soft_wrap=True)
        by_code = report.get("platformWarnings", {}).get("byCode")
        if by_code:
            codes = _pairs(by_code)
            self.console.print(
                f"platform warnings: {codes} (listed in the report)", markup=False, soft_wrap=True
            )
        rows = _VALIDATION if title == "validate" else _SUMMARY
        if self.console.is_terminal:
            from rich.table import Table

            table = Table(title=title, show_header=False)
            table.add_column("", style="bold")
            table.add_column("", justify="right")
            for key, label in rows:
                table.add_row(label, str(report[key]))
            self.console.print(table)
        else:
            self.console.print(
                f"{title}: " + ", ".join(f"{label} {report[key]}" for key, label in rows),
                markup=False,
                soft_wrap=True,
            )
        # validate's notSent are its valid rows (a dry run sends nothing): not failures.
        unsent = 0 if title == "validate" else report["notSent"]
        listing = report["rejected"] + report["failed"] + unsent or result.message
        if listing and result.failed_path is not None:
            self.console.print(f"failed file: {result.failed_path}", markup=False)
        if result.message:
            self.error(result.message)


def render_status(summaries: list[dict[str, Any]]) -> None:
    """`histimport status` for people, on stdout; with several state dirs, a total too."""
    out: list[str] = []
    totals: dict[str, int] = {}
    for summary in summaries:
        out.append(f"state dir {summary['stateDir']}")
        accepted, refused_by = summary["acceptedByTarget"], summary["refusedByTarget"]
        for target in dict.fromkeys([*accepted, *refused_by]):
            n, refused = accepted.get(target, 0), refused_by.get(target, 0)
            out.append(f"  {target or '(no target)'}: {n} accepted, {refused} refused")
        last = summary["lastRun"]
        if last:
            out.append("  last run now: " + _pairs(last))
        if summary["errorCodes"]:
            out.append("  most frequent errors: " + _pairs(summary["errorCodes"]))
        for run in summary["runs"]:
            state = _run_state(run)
            out.append(f"  run {run['id']} {run['command']} {run['startedAt']}: {state}")
            if run["sources"]:
                out.append("    sources: " + ", ".join(s["path"] for s in run["sources"]))
            if run["counts"]:
                out.append("    " + _pairs(run["counts"]))
        for key, value in last.items():
            totals[key] = totals.get(key, 0) + value
    if len(summaries) > 1:
        out.append("total: " + _pairs(totals))
    sys.stdout.write("\n".join(out) + "\n")


def _run_state(run: dict[str, Any]) -> str:
    """A run's outcome in words: what its exit status meant."""
    if not run["finishedAt"]:
        return "running, or killed"  # a run with no finish time
    counts = run["counts"]
    listed = {k: counts.get(k, 0) for k in ("rejected", "failed", "notSent")}
    if run.get("carriedOver"):
        listed["carried over from earlier failed files"] = run["carriedOver"]
    left = ", ".join(f"{n} {k}" for k, n in listed.items() if n)
    return {
        "ok": "finished: everything accepted",
        "incomplete": f"finished; its failed file lists {left or 'entries'}",
        "interrupted": f"interrupted; its failed file lists {left or 'nothing'}",
        "aborted": "stopped at once (credentials, TLS, the ledger or an output)",
        "usage": "stopped by a usage error (exit 2)",
    }.get(run["status"], str(run["status"]))


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items())
