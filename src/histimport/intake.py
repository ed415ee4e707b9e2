"""Reading and checking: every source in turn, row by row, in input order, each row mapped
and checked into a message to send (`Valid`) or a row that never leaves (`Rejected`). JSONL
rows are checked in forked workers (`fanout`) when there are CPUs to spare.
"""

from __future__ import annotations

import itertools
import operator
import os
import pickle
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, fields
from functools import partial
from typing import IO, TYPE_CHECKING, Any

import orjson

from .batch import Envelope
from .check import Rejected, Valid, check_row
from .config import Config
from .errors import UsageError
from .fanout import Fanout
from .logs import timestamp
from .mapping import Mapper, Mapping
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
from .shard import shard_of

if TYPE_CHECKING:
    from .matching import Selection

WARNINGS_KEPT = 10_000
"""Warnings are counted without limit; the first ones are kept for the outputs."""

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

    def packed(batch: list[tuple[int, bytes] | RawRow]) -> list[tuple[Any, ...] | bytes]:
        # A valid row travels back as a plain tuple, any other row pickled: the result is
        # then marshalled whole (see fanout), a tenth of pickling each row's dataclass.
        return [
            _valid_fields(r)
            if type(r) is Valid and r.warnings is None
            else pickle.dumps(r, pickle.HIGHEST_PROTOCOL)
            for r in work(batch)
        ]

    if warm_up:
        first = list(itertools.islice(lines, IN_PROCESS_ROWS))
        yield from work(first)
        if len(first) < IN_PROCESS_ROWS:
            return
    with Fanout(packed, workers) as fanout:
        for checked in fanout.map(_batches(lines)):
            for r in checked:
                yield Valid(*r) if type(r) is tuple else pickle.loads(r)


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


def realpath(source: Source) -> str | None:
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


SAMPLE_ROWS = 100_000
"""Rows of a source that `map init` checks its guesses against."""


def source_sample(
    path: str,
    fmt: str | None,
    *,
    delimiter: str | None = None,
    encoding: str | None = None,
    rows: int = SAMPLE_ROWS,
) -> tuple[list[str], list[dict[str, str]]]:
    """A source's field names (its CSV header, or the dotted paths of its first JSON
    object) and its first `rows` rows, each value as text (JSON objects by their dotted
    paths), in one pass."""
    (source,) = open_sources([path], fmt)
    headers: list[str] | None = None
    sample: list[dict[str, str]] = []
    with open_source(source) as stream:
        if source.format == "csv":
            found = read_csv(
                stream, 0, max_line_bytes=1 << 24, delimiter=delimiter, encoding=encoding
            )
            first = next(found, None)
            if first is None or first.header is None:
                raise UsageError(f"{path}: no header row")
            headers = first.header
        else:
            found = read_jsonl(stream, 0, max_line_bytes=1 << 24, name=path)
        for row in found:
            if len(sample) >= rows:
                break
            if source.format == "csv" and row.data is not None:
                sample.append(row.data)  # its cells' text by header already
            elif isinstance(row.data, dict):
                flat = _flat(row.data)
                headers = headers or list(flat)
                sample.append({k: _text(v) for k, v in flat.items()})
    if headers is None:
        raise UsageError(f"{path}: no JSON object found")
    return headers, sample


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


@dataclass
class Intake:
    """The rows of a run's sources, read, mapped and checked, in input order: iterate
    `rows()` once. It keeps what it met on the way: the warnings, the last line handed on
    of each source and which sources were read to their end."""

    config: Config
    sources: list[Source]
    selection: Selection | None = None  # retry: only the rows its failed files list
    forks: bool = True  # False: another thread of the process could hold a lock a fork copies
    on_source: Callable[[str], None] = lambda path: None
    on_read: Callable[[int, int | None], None] = lambda done, total: None
    warning_count: int = 0
    warnings: list[dict[str, Any]] = field(default_factory=list)
    yielded: dict[int, int] = field(default_factory=dict)  # by source: the last line handed on
    read_through: set[int] = field(default_factory=set)  # the sources read to their end

    def rows(self) -> Iterator[Valid | Rejected]:
        return self._checked(self.sources)

    def _checked(self, sources: list[Source]) -> Iterator[Valid | Rejected]:
        """Read -> map -> validate, every source in turn, counting what is read."""
        config = self.config
        mapping = Mapping.load(config.map_file) if config.map_file is not None else None
        max_body = config.max_request_bytes - Envelope(config.callback_url).overhead
        now = timestamp()
        check = partial(
            check_row, notify=config.notify, strict=config.strict, now=now, max_body=max_body
        )
        yielded = self.yielded
        for index, source in enumerate(sources):
            self.on_source(source.path)
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
                        self.on_read(source.size, total)
                    if not self._owns(checked):
                        continue
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
            self.on_read(source.size, total)

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
        if not self.forks:
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
