"""`retry`: re-send what failed files list, and keep listing what it does not send."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Config
from .outputs import NOT_READ, FailedEntry, read_failed_file
from .read import RawRow
from .run import Observer, Run, RunResult


@dataclass
class Selection:
    """What `retry` re-sends: listed sourceUuids, and rows at listed lines. An entry whose
    row the run did not stage (not in the sources any more, another shard's, or not reached
    before the run was interrupted) is listed again as it was, as are the carried ones."""

    uuids: dict[str, FailedEntry] = field(default_factory=dict)
    lines: dict[tuple[str, int], FailedEntry] = field(default_factory=dict)
    carried: list[FailedEntry] = field(default_factory=list)
    rest_from: dict[str, int] = field(default_factory=dict)
    """Sources that could not be read past a line: every row from it on is wanted."""
    created: dict[int, str] = field(default_factory=dict)
    """When the failed file that lists an entry was written, by id of the entry."""

    def add(self, entry: FailedEntry, created: str | None = None) -> None:
        if created is not None:
            self.created[id(entry)] = created
        if entry.sourceUuid:
            self.uuids[entry.sourceUuid] = entry
        if entry.stage == "rejected" or not entry.sourceUuid:
            self.lines[(entry.source, entry.line)] = entry
        if _broke_off(entry):
            self.rest_from[entry.source] = min(
                self.rest_from.get(entry.source, entry.line), entry.line
            )

    def wants(self, path: str, row: RawRow) -> bool:
        if (path, row.line) in self.lines or row.line >= self.rest_from.get(path, row.line + 1):
            return True
        uuid = row.data.get("sourceUuid") if row.data is not None else None
        return isinstance(uuid, str) and uuid in self.uuids

    def unmet(
        self, staged_uuids: set[str], staged_lines: set[tuple[str, int]], *, read_whole: bool
    ) -> list[FailedEntry]:
        """The carried entries, then the wanted ones whose row this run did not stage: what
        the ledger holds, not what was read, so that an interruption loses none. A source
        that broke off is met once read whole (to its end, or to where it breaks off now,
        which the new failed file then says)."""
        out = list(self.carried)
        seen: set[int] = set()
        for entry in [*self.uuids.values(), *self.lines.values()]:
            if id(entry) in seen:
                continue
            seen.add(id(entry))
            # A message is met by its sourceUuid; its line may hold another row by now. A
            # rejected row is met by its line, too: fixed, its sourceUuid may have changed
            # (or, with --generate-source-uuid, been derived from what changed).
            if entry.sourceUuid:
                met = entry.sourceUuid in staged_uuids or (
                    entry.stage == "rejected" and (entry.source, entry.line) in staged_lines
                )
            elif _broke_off(entry):
                met = read_whole
            else:
                met = (entry.source, entry.line) in staged_lines
            if not met:
                out.append(entry)
        return out


def _broke_off(entry: FailedEntry) -> bool:
    """The entry of a source that was not read past its line: it could not be (UNREADABLE),
    or the run was stopped there (NOT_READ)."""
    return any(e.get("errorCode") in ("UNREADABLE", NOT_READ) for e in entry.errors)


def _same_file(path: str) -> str:
    """What tells one source from another: the file a path leads to (stdin is itself)."""
    return path if path == "-" else os.path.realpath(path)


def _key(entry: FailedEntry) -> tuple[str | int, ...]:
    """One message, or one row without a sourceUuid, however many failed files list it."""
    return (entry.sourceUuid,) if entry.sourceUuid else (entry.source, entry.line)


def retry(
    failed_files: Sequence[str | os.PathLike[str]],
    config: Config | None = None,
    *,
    include_permanent: bool = False,
    observer: Observer | None = None,
) -> RunResult:
    """Re-send what one or more failed files list: retryable failures, unsent messages and
    rejected rows (re-read, as the user may have fixed them); with `include_permanent`,
    also the messages the platform refused."""
    cfg = config or Config()
    selection = Selection()
    entries: dict[tuple[str | int, ...], tuple[FailedEntry, str | None]] = {}
    paths: list[str] = []
    formats: dict[str, str] = {}
    maps: set[str] = set()
    base_url: str | None = None
    spelt: dict[str, str] = {}  # a source's path as first met, by the file it names
    for failed_file in failed_files:
        document = read_failed_file(Path(failed_file))
        base_url = base_url or document.baseUrl
        for source in document.sources:
            # One file named two ways (./p.jsonl by one run, /data/p.jsonl by another) is
            # read once: twice, its rows would be repeats of themselves.
            path = spelt.setdefault(_same_file(source.path), source.path)
            if path not in paths:
                paths.append(path)
                if source.format is not None:
                    formats[path] = source.format
            if source.map:
                maps.add(source.map)
        for entry in document.failures:
            path = spelt.get(_same_file(entry.source), entry.source)
            if path != entry.source:
                entry = entry.model_copy(update={"source": path})
            # A later file's word on a message is the latest.
            entries[_key(entry)] = (entry, document.createdAt)
    for entry, created in entries.values():
        if entry.stage in ("rejected", "notSent") or entry.retryable or include_permanent:
            selection.add(entry, created)
        else:
            # Not sent again, but still not accepted: the new failed file lists it too.
            selection.carried.append(entry)
    if cfg.base_url is None and not cfg.sandbox and base_url is not None:
        cfg = replace(cfg, base_url=base_url)
    if cfg.map_file is None and len(maps) == 1:
        cfg = replace(cfg, map_file=Path(maps.pop()))  # the mapping the failed run used
    run = Run(cfg, observer, selection, include_permanent=include_permanent)
    return run.execute(paths, "retry", formats)
