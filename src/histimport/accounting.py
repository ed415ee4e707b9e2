"""Accounting for a run, at its end: every row read is accepted, failed, rejected or not
sent, and the counts add up; then the failed file, the report, and how the process exits."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config
from .deliver import DeliveryStats
from .errors import ExitStatus, InvariantError, OutputError, UsageError
from .intake import Intake
from .ledger import Ledger
from .matching import unmet
from .outputs import (
    NOT_READ,
    REPORT_FORMAT,
    FailedEntry,
    check_not_anothers,
    write_accepted,
    write_failed,
    write_report,
    writing,
)
from .read import Source

if TYPE_CHECKING:
    from .matching import Selection


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
    notes: list[str] = field(default_factory=list)  # plain lines for the summary


@dataclass
class Ending:
    """What a run knows at its end."""

    config: Config
    sources: list[Source]
    base_url: str | None
    intake: Intake
    selection: Selection | None  # retry: what its failed files asked for
    read: int  # rows recorded
    interrupted: bool
    read_whole: bool  # every row of every source was recorded
    stats: DeliveryStats | None  # None: nothing was to be sent (validate)
    started: float  # monotonic
    owner: dict[str, Any]  # who writes the failed file (`outputs.owner`)
    include_permanent: bool = False  # retry: refusals for good were sent again


def account(ledger: Ledger, end: Ending) -> RunResult:
    """Check the counts, write the failed file and the report, and close the run in the
    ledger; what the run did."""
    config, intake, stats = end.config, end.intake, end.stats
    delivered = stats or DeliveryStats()
    counts = {"read": end.read, **ledger.counts()}
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
    shards = _shards(end)
    if end.selection is not None:
        carried = unmet(end.selection, ledger, end.sources, read_whole=end.read_whole)
    else:
        carried = _unread(ledger, end, shards)
    _still_ours(config.failed_out, end.owner)
    with writing(config.failed_out, "--failed-out"):
        write_failed(
            config.failed_out,
            base_url=end.base_url,
            sources=end.sources,
            counts={**counts, "notSent": 0} if config.dry_run else counts,
            failures=ledger.failures(rejected_only=config.dry_run),
            error_codes=error_codes,
            preview=preview,
            carried=carried,
            shards=shards,
            owner=end.owner,
        )
    report = _report(counts, end, delivered, error_codes)
    notes: list[str] = []
    if end.selection is not None:
        report["carriedOver"] = _carried_over(carried)
        notes = _retry_notes(report["carriedOver"], include_permanent=end.include_permanent)
    if config.accepted_out is not None:
        with writing(config.accepted_out, "--accepted-out"):
            write_accepted(config.accepted_out, ledger.accepted())
    if config.report is not None:
        with writing(config.report, "--report"):
            write_report(config.report, report)
    plan = []
    if config.dry_run:
        plan = [
            {"departmentUUID": d, "customerUUID": c, "messages": n, "requests": r}
            for d, c, n, r in ledger.plan(config.chunk_size)
        ]
    status, message = _verdict(counts, end, delivered, carried)
    ledger.finish_run(status.name.lower(), report)
    return RunResult(
        status,
        counts,
        report,
        config.failed_out,
        preview,
        plan=plan,
        warnings=intake.warnings,
        message=message,
        notes=notes,
    )


def _report(
    counts: dict[str, int], end: Ending, delivered: DeliveryStats, error_codes: Counter[str]
) -> dict[str, Any]:
    """The run's report (`histimport.report/v1`)."""
    elapsed = time.monotonic() - end.started
    return {
        "format": REPORT_FORMAT,
        **counts,
        "warnings": end.intake.warning_count + delivered.warning_codes.total(),
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
        "platformWarnings": {
            "byCode": dict(delivered.warning_codes.most_common()),
            "listed": delivered.warnings_listed,
        },
    }


def _verdict(
    counts: dict[str, int], end: Ending, delivered: DeliveryStats, carried: list[FailedEntry]
) -> tuple[ExitStatus, str | None]:
    """How the process exits, and the line that says why when the counts do not."""
    config, stats = end.config, end.stats
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
    elif end.interrupted and not end.read_whole:
        status = ExitStatus.INTERRUPTED
        message = f"interrupted while reading, after {end.read} rows: nothing was sent"
        if stats is not None and stats.requests:
            message = (
                f"interrupted while reading, after {end.read} rows: requests in flight "
                "were settled; what was read and not accepted is listed as notSent"
            )
            if delivered.abandoned:
                message = (
                    f"interrupted twice while reading, after {end.read} rows: requests "
                    "in flight were abandoned; what was read and not accepted is listed "
                    "as notSent"
                )
        if config.dry_run:
            message = f"interrupted while reading, after {end.read} rows"
        elif end.selection is None:
            message += (
                "; the failed file says where the rows not read begin: run the same "
                "command again, or retry the failed file, to go on"
            )
        else:
            message += "; the new failed file lists again what the failed files listed"
    elif end.interrupted:
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
    return status, message


def _still_ours(path: Path, owner: dict[str, Any]) -> None:
    """The failed file is not another import's, still: one may have written it while this
    run went on (two imports in one directory, both with the default name)."""
    try:
        check_not_anothers(path, owner)
    except UsageError as exc:
        raise OutputError(
            f"{exc.message}, written while this run went on",
            hint="the outcomes are in the state dir: run the same command again with another "
            "--failed-out (nothing accepted is sent again)",
        ) from exc


def _carried_over(carried: list[FailedEntry]) -> dict[str, int]:
    """retry: the entries of its failed files it lists again unchanged, by why."""
    refused = sum(1 for e in carried if e.stage == "failed" and not e.retryable)
    unread = sum(1 for e in carried if any(x.get("errorCode") == NOT_READ for x in e.errors))
    return {
        "refusedForGood": refused,
        "notRead": unread,
        "notFound": len(carried) - refused - unread,
    }


def _retry_notes(carried: dict[str, int], *, include_permanent: bool) -> list[str]:
    """What a retry did not send, in words: its counts are of the rows it read again."""
    notes = []
    if carried["refusedForGood"]:
        notes.append(
            f"listed again unchanged: {carried['refusedForGood']} messages the platform "
            "refused for good (not sent again; --include-permanent sends them, once they "
            "are fixed in the source)"
        )
    if carried["notFound"]:
        notes.append(
            f"listed again unchanged: {carried['notFound']} entries whose rows were not "
            "found in the sources (moved, or another shard's)"
        )
    if carried["notRead"]:
        notes.append(
            f"listed again: {carried['notRead']} sources not read to their end "
            "(the run was stopped); retry the new failed file to read on"
        )
    if not notes and include_permanent:
        notes.append("messages refused for good were sent again (--include-permanent)")
    return notes


def _shards(end: Ending) -> dict[int, str]:
    """By source index, the shard whose rows alone were read of it (K/N): this run's
    --shard, or, for a retry without one, the shard of the entries it read on from
    (one shard's alone); an UNREADABLE entry records it."""
    shard = end.config.shard
    if shard is not None:
        return dict.fromkeys(range(len(end.sources)), f"{shard[0]}/{shard[1]}")
    if end.selection is None:
        return {}
    out = {}
    for i, source in enumerate(end.sources):
        found = {e.shard for e in end.selection.read_on if e.source == source.path}
        if len(found) == 1 and None not in found:
            out[i] = str(found.pop())
    return out


def _unread(ledger: Ledger, end: Ending, shards: dict[int, str]) -> list[FailedEntry]:
    """`load` stopped while reading: an entry for where each source's unstaged rest
    begins (after its last row staged: a source's rows are staged in order, and the
    last batch handed on may not have been), which `retry` reads on from. Without it,
    those rows would stand in no failed file, and a retry would find nothing left."""
    if end.read_whole or end.config.dry_run:
        return []
    reached = ledger.last_lines()
    unread = []
    for index, source in enumerate(end.sources):
        staged = reached.get(index, 0)
        if index in end.intake.read_through and end.intake.yielded.get(index, 0) <= staged:
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


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
