"""Matching, for `retry`: the entries of failed files against the rows read again. Which
rows a retry wants (`Selection.wants`), and which entries it must list again because no row
of this run met them (`unmet`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .outputs import NOT_READ, FailedEntry, has_error, read_failed_file
from .read import UNREADABLE, RawRow, Source
from .shard import parse_shard, shard_of

if TYPE_CHECKING:
    from .ledger import Ledger


@dataclass
class Selection:
    """What `retry` re-sends: listed sourceUuids, and rows at listed lines. An entry whose
    row the run did not stage (not in the sources any more, another shard's, or not reached
    before the run was interrupted) is listed again as it was, as are the carried ones."""

    uuids: dict[str, FailedEntry] = field(default_factory=dict)
    lines: dict[tuple[str, int], FailedEntry] = field(default_factory=dict)
    carried: list[FailedEntry] = field(default_factory=list)
    rest_from: dict[str, list[tuple[int, tuple[int, int] | None]]] = field(default_factory=dict)
    """Sources that were not read past a line: every row from it on is wanted (with a
    shard, K of N: every row of that shard)."""
    read_on: list[FailedEntry] = field(default_factory=list)
    """The entries behind `rest_from`."""
    created: dict[int, str] = field(default_factory=dict)
    """When the failed file that lists an entry was written, by id of the entry."""

    def add(self, entry: FailedEntry, created: str | None = None) -> None:
        if created is not None:
            self.created[id(entry)] = created
        if _broke_off(entry):
            # Its line too is wanted through `rest_from`, which alone knows the shard. A
            # load stopped while reading sent nothing and listed every row it had staged:
            # its source is read again from the top, as lines may have moved since (the
            # user fixing a listed row above may delete one); what it had staged is
            # listed anyway, and what the ledger holds as accepted is not sent again.
            shard = parse_shard(entry.shard, None) if entry.shard else None
            line = 1 if has_error(entry.errors, NOT_READ) else entry.line
            self.rest_from.setdefault(entry.source, []).append((line, shard))
            self.read_on.append(entry)
            return
        if entry.sourceUuid:
            self.uuids[entry.sourceUuid] = entry
        if entry.stage == "rejected" or not entry.sourceUuid:
            self.lines[(entry.source, entry.line)] = entry

    def wants(self, path: str, row: RawRow) -> bool:
        if (path, row.line) in self.lines or (
            row.error is not None and row.error.code == UNREADABLE
        ):
            # A source that breaks off now, earlier than it did, says so in the new file.
            return True
        for line, shard in self.rest_from.get(path, ()):
            if row.line >= line and (shard is None or _in_shard(row, shard)):
                return True
        uuid = row.data.get("sourceUuid") if row.data is not None else None
        return isinstance(uuid, str) and uuid in self.uuids

    def unmet(
        self,
        staged_uuids: set[str],
        staged_lines: dict[tuple[str, int], str | None],
        broken: set[tuple[str, int]],
        *,
        read_whole: bool,
    ) -> list[FailedEntry]:
        """The carried entries (but those the run read again, which the ledger lists), then
        the wanted ones whose row this run did not stage: what the ledger holds, not what
        was read, so that an interruption loses none. A source that broke off is met once
        read whole (to its end, or to where it breaks off now, which the new failed file
        then says), or once it broke off at the same line again (`broken`).
        `staged_lines`: the sourceUuid of the row staged at each wanted line (the ledger
        leaves out old messages moved there)."""
        out = [e for e in self.carried if not (e.sourceUuid and e.sourceUuid in staged_uuids)]
        seen: set[int] = set()
        for entry in [*self.uuids.values(), *self.lines.values(), *self.read_on]:
            if id(entry) in seen:
                continue
            seen.add(id(entry))
            # A message is met by its sourceUuid; its line may hold another row by now. A
            # rejected row is met by its line, too: fixed, its sourceUuid may have changed
            # (or, with --generate-source-uuid, been derived from what changed).
            if entry.sourceUuid and entry.stage != "rejected":
                met = entry.sourceUuid in staged_uuids
            elif entry.sourceUuid:
                # A rejected row: met by the row at its line (fixed, perhaps under another
                # sourceUuid), or by its sourceUuid staged (moved elsewhere); for the repeat
                # of another row's, that is the other row's, unless every row was read.
                met = self._row_at(entry, staged_lines) or (
                    entry.sourceUuid in staged_uuids
                    and (read_whole or not has_error(entry.errors, "DUPLICATE_SOURCE_UUID"))
                )
            elif _broke_off(entry):
                met = read_whole or (entry.source, entry.line) in broken
            else:
                met = self._row_at(entry, staged_lines)
            if not met:
                out.append(entry)
        return out

    def _row_at(self, entry: FailedEntry, staged_lines: dict[tuple[str, int], str | None]) -> bool:
        """Whether the row staged at the entry's line is the one listed there: not one that
        the failed files list at another line (moved there: a line above was deleted)."""
        place = (entry.source, entry.line)
        if place not in staged_lines:
            return False
        uuid = staged_lines[place]
        listed = self.uuids.get(uuid) if uuid is not None else None
        return listed is None or (listed.source, listed.line) == place


def _broke_off(entry: FailedEntry) -> bool:
    """The entry of a source that was not read past its line: it could not be (UNREADABLE),
    or the run was stopped there (NOT_READ). Such an entry stands for no message (none
    has a sourceUuid): a platform's error code that happens to read alike is not one."""
    return entry.sourceUuid is None and has_error(entry.errors, UNREADABLE, NOT_READ)


def _in_shard(row: RawRow, shard: tuple[int, int]) -> bool:
    """As `load --shard` takes rows: by their two ids; a row without them is shard 0's."""
    data = row.data or {}
    department, customer = data.get("departmentUUID"), data.get("customerUUID")
    if not (isinstance(department, str) and department and isinstance(customer, str) and customer):
        return shard[0] == 0  # ids missing, or not strings, or empty: as the check reads them
    return shard_of(department, customer, shard[1]) == shard[0]


def _same_file(path: str) -> str:
    """What tells one source from another: the file a path leads to (stdin is itself)."""
    return path if path == "-" else os.path.realpath(path)


def _key(entry: FailedEntry) -> tuple[str | int, ...]:
    """One message, or one row without a sourceUuid (or one shard's rest of a source),
    however many failed files list it."""
    if entry.sourceUuid:
        return (entry.sourceUuid,)
    return (entry.source, entry.line, entry.shard or "")


@dataclass
class Wanted:
    """What failed files ask a retry for: the selection, the sources to read again (in
    the order first listed), their formats and mappings, and the platform they name."""

    selection: Selection
    paths: list[str]
    formats: dict[str, str]
    maps: set[str]
    base_url: str | None


def select(failed_files: Sequence[str | os.PathLike[str]], *, include_permanent: bool) -> Wanted:
    """Read failed files into what a retry re-sends: retryable failures, unsent messages
    and rejected rows (re-read, as the user may have fixed them); with `include_permanent`,
    also the messages the platform refused. The latest file's word on a message wins."""
    selection = Selection()
    entries: dict[tuple[str | int, ...], tuple[FailedEntry, str | None]] = {}
    displaced: list[tuple[FailedEntry, str | None]] = []
    paths: list[str] = []
    formats: dict[str, str] = {}
    maps: set[str] = set()
    base_url: str | None = None
    spelt: dict[str, str] = {}  # a source's path as first met, by the file it names
    chosen: dict[str, str] = {}  # that path, by each way the failed files spell it
    for failed_file in failed_files:
        document = read_failed_file(Path(failed_file))
        base_url = base_url or document.baseUrl
        for source in document.sources:
            # One file named two ways (./p.jsonl by one run, /data/p.jsonl by another) is
            # read once: twice, its rows would be repeats of themselves.
            path = chosen[source.path] = spelt.setdefault(_same_file(source.path), source.path)
            if path not in paths:
                paths.append(path)
                if source.format is not None:
                    formats[path] = source.format
            if source.map:
                maps.add(source.map)
        for entry in document.failures:
            path = chosen.get(entry.source, entry.source)  # not a listed source: left alone
            if path != entry.source:
                entry = entry.model_copy(update={"source": path})
            # A later file's word on a message is the latest.
            key = _key(entry)
            earlier = entries.get(key)
            if (
                earlier is not None
                and earlier[0].stage == "rejected"
                and (earlier[0].source, earlier[0].line) != (entry.source, entry.line)
            ):
                displaced.append(earlier)  # another row's, not the same row's earlier word
            entries[key] = (entry, document.createdAt)
    for entry, created in entries.values():
        if entry.stage in ("rejected", "notSent") or entry.retryable or include_permanent:
            selection.add(entry, created)
        else:
            # Not sent again, but still not accepted: the new failed file lists it too.
            selection.carried.append(entry)
    for entry, created in displaced:
        # Another row rejected with the same sourceUuid (the repeat of an invalid row, say):
        # its line is still wanted, fixed since maybe, under another sourceUuid.
        if (entry.source, entry.line) not in selection.lines:
            selection.lines[(entry.source, entry.line)] = entry
            if created is not None:
                selection.created[id(entry)] = created
    return Wanted(selection, paths, formats, maps, base_url)


def unmet(
    selection: Selection, ledger: Ledger, sources: list[Source], *, read_whole: bool
) -> list[FailedEntry]:
    """The entries a retry lists again, from what the ledger staged."""
    index = {s.path: i for i, s in enumerate(sources)}
    wanted_lines = [  # a message is met by its sourceUuid; a reject by its line, too
        (index[p], n, selection.created.get(id(entry)))
        for (p, n), entry in selection.lines.items()
        if p in index
    ]
    # Carried messages too: read again all the same (a source read on from a line), they
    # are the ledger's to list.
    carried = (e.sourceUuid for e in selection.carried if e.sourceUuid)
    uuids, lines = ledger.staged_among([*selection.uuids, *carried], wanted_lines)
    broken = {(sources[i].path, n) for i, n in ledger.broken_lines()}
    return selection.unmet(
        uuids,
        {(sources[i].path, n): uuid for (i, n), uuid in lines.items()},
        broken,
        read_whole=read_whole,
    )
