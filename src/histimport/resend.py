"""`retry`: re-send what failed files list, and keep listing what it does not send."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Config
from .outputs import FailedEntry, read_failed_file
from .read import RawRow
from .run import Observer, Run, RunResult


@dataclass
class Selection:
    """What `retry` re-sends: listed sourceUuids, and rows at listed lines. Entries it never
    meets again in the sources (a source edited since) are listed again as they were."""

    uuids: dict[str, FailedEntry] = field(default_factory=dict)
    lines: dict[tuple[str, int], FailedEntry] = field(default_factory=dict)
    carried: list[FailedEntry] = field(default_factory=list)

    def add(self, entry: FailedEntry) -> None:
        if entry.sourceUuid:
            self.uuids[entry.sourceUuid] = entry
        if entry.stage == "rejected" or not entry.sourceUuid:
            self.lines[(entry.source, entry.line)] = entry

    def wants(self, path: str, row: RawRow) -> bool:
        if self.lines.pop((path, row.line), None) is not None:
            if row.data is not None and isinstance(row.data.get("sourceUuid"), str):
                self.uuids.pop(row.data["sourceUuid"], None)
            return True
        uuid = row.data.get("sourceUuid") if row.data is not None else None
        return isinstance(uuid, str) and self.uuids.pop(uuid, None) is not None

    def unmet(self) -> list[FailedEntry]:
        """The kept entries, then those wanted but not found."""
        found = {id(e) for e in self.carried}
        missing = [e for e in [*self.uuids.values(), *self.lines.values()] if id(e) not in found]
        unique = list({id(e): e for e in missing}.values())
        return self.carried + unique


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
    paths: list[str] = []
    formats: dict[str, str] = {}
    maps: set[str] = set()
    base_url: str | None = None
    for failed_file in failed_files:
        document = read_failed_file(Path(failed_file))
        base_url = base_url or document.baseUrl
        for source in document.sources:
            if source.path not in paths:
                paths.append(source.path)
                if source.format is not None:
                    formats[source.path] = source.format
            if source.map:
                maps.add(source.map)
        for entry in document.failures:
            if entry.stage in ("rejected", "notSent") or entry.retryable or include_permanent:
                selection.add(entry)
            else:
                # Not sent again, but still not accepted: the new failed file lists it too.
                selection.carried.append(entry)
    if cfg.base_url is None and not cfg.sandbox and base_url is not None:
        cfg = replace(cfg, base_url=base_url)
    if cfg.map_file is None and len(maps) == 1:
        cfg = replace(cfg, map_file=Path(maps.pop()))  # the mapping the failed run used
    run = Run(cfg, observer, selection, include_permanent=include_permanent)
    return run.execute(paths, "retry", formats)
