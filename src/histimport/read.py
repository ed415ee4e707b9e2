"""Read sources: JSONL (optionally gzipped, or stdin) into raw rows with exact line numbers.

A row that cannot be read becomes a `RawRow` carrying an error, never an exception; only a
source that cannot be opened at all raises `SourceError`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import stat
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from .config import SourceFormat
from .errors import SourceError

FORMATS = tuple(SourceFormat)
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_SKIP_CHUNK = 1024 * 1024
READ_ERRORS = (OSError, EOFError, zlib.error)
"""What reading a damaged source raises (gzip.BadGzipFile is an OSError)."""


@dataclass(frozen=True, slots=True)
class RowError:
    """Why a row could not be read: a code and plain words."""

    code: str
    description: str


@dataclass(slots=True)
class RawRow:
    """One record of a source: its parsed object, or why it has none."""

    source: int
    line: int
    data: dict[str, Any] | None
    error: RowError | None = None
    problems: list[RowError] | None = None
    header: list[str] | None = None  # a CSV source's header row: names, not a record
    nulls: bool = True
    """Whether `data` may hold a null: False for a JSON line without the literal `null`."""


@dataclass
class Source:
    """A source as the user named it; size and sha256 are known once it has been read."""

    path: str
    format: str
    size: int = 0
    sha256: str = ""
    map: str | None = None
    _digest: Any = field(default=None, repr=False)

    @property
    def is_stdin(self) -> bool:
        return self.path == "-"


def named_format(path: str) -> str | None:
    """The format a source's name tells (`.gz` looked through), if any."""
    name = path[:-3] if path.endswith(".gz") else path
    return _SUFFIXES.get(Path(name).suffix.lower())


def detect_format(path: str, explicit: str | None) -> str:
    """The format of a source from `--format` or its name (`.gz` looked through)."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise SourceError(f"unknown format {explicit!r}", hint="use jsonl or csv")
        return explicit
    if path == "-":
        raise SourceError("reading stdin needs --format", hint="add --format jsonl or csv")
    fmt = named_format(path)
    if fmt is None:
        raise SourceError(
            f"{path}: cannot tell the format from the file name",
            hint="name it .jsonl, .ndjson or .csv (optionally .gz), or pass --format",
        )
    return fmt


class _HashingReader(io.RawIOBase):
    """Counts and hashes the bytes of a source as they are read, so nothing is read twice."""

    def __init__(self, raw: IO[bytes], source: Source) -> None:
        self._raw = raw
        self._source = source
        self._digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._digest.update(data)
        self._source.size += n
        if n == 0:
            self._source.sha256 = self._digest.hexdigest()
        return n

    def close(self) -> None:
        if self._raw is not sys.stdin.buffer:
            self._raw.close()
        super().close()


def open_source(source: Source) -> IO[bytes]:
    """Open a source for binary reading, decompressing gzip found by its magic bytes."""
    try:
        raw: IO[bytes] = sys.stdin.buffer if source.is_stdin else open(source.path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise SourceError(
            f"{source.path}: cannot open: {exc.strerror or exc}", hint="check the path"
        ) from exc
    buffered = io.BufferedReader(_HashingReader(raw, source), buffer_size=256 * 1024)
    if buffered.peek(2)[:2] == _GZIP_MAGIC:
        return io.BufferedReader(_Gunzipped(buffered), 256 * 1024)
    return buffered


class _Gunzipped(io.RawIOBase):
    """A gzip stream read a piece at a time. GzipFile.read(n) goes on until it has n bytes,
    so that a damage in them loses all of them; read1 hands over what was decompressed,
    and the damage is raised by the next read: every whole line before it is read."""

    def __init__(self, compressed: IO[bytes]) -> None:
        self._compressed = compressed
        self._gz = gzip.GzipFile(fileobj=compressed, mode="rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # In pieces of 16 KiB at most: zlib raises a damage it meets before it has the
        # bytes asked for, losing those it had.
        data = self._gz.read1(min(len(buffer), 1 << 14))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._gz.close()  # which leaves the stream it was given open
        self._compressed.close()
        super().close()


def check_readable(source: Source) -> None:
    """Fail early, before anything is sent, if a source cannot be opened."""
    if source.is_stdin:
        return
    path = Path(source.path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SourceError(f"{source.path}: no such file", hint="check the path") from None
    except OSError as exc:
        raise SourceError(f"{source.path}: cannot open: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        raise SourceError(f"{source.path}: is a directory", hint="name the export's file")
    if not stat.S_ISREG(mode):
        return  # a pipe, as <(zcat export.jsonl.gz) gives: opened once, when it is read
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SourceError(f"{source.path}: cannot open: {exc.strerror or exc}") from exc


def read_jsonl(
    stream: IO[bytes], index: int, *, max_line_bytes: int, name: str = "source"
) -> Iterator[RawRow]:
    """Yield one row per non-blank physical line; blank lines are skipped and not counted."""
    for item in jsonl_lines(stream, index, max_line_bytes=max_line_bytes, name=name):
        yield as_row(item, index)


def as_row(item: tuple[int, bytes] | RawRow, index: int) -> RawRow:
    """An item of `jsonl_lines` as a row: a line parsed, or the error already found."""
    return item if isinstance(item, RawRow) else parse_json_line(item[1], index, item[0])


def jsonl_lines(
    stream: IO[bytes], index: int, *, max_line_bytes: int, name: str = "source"
) -> Iterator[tuple[int, bytes] | RawRow]:
    """The non-blank lines of a JSONL source as (line number, bytes), not parsed yet; a line
    that cannot be read is a row with its error in their place. A source whose first line
    opens a JSON array that goes on over further lines is a SourceError: it is one document,
    not JSON Lines, and read line by line most of its elements would be rejected."""
    line_no = 0
    first = True
    try:
        while True:
            line = stream.readline(max_line_bytes + 1)
            if not line:
                return
            line_no += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                skip_rest_of_line(stream)
                yield RawRow(
                    index,
                    line_no,
                    None,
                    RowError("LINE_TOO_LONG", f"line is longer than {max_line_bytes} bytes"),
                )
                continue
            if line_no == 1 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            if not line.strip():
                continue
            if first:
                first = False
                _refuse_json_array(line, line_no, name)
            yield line_no, line.rstrip(b"\r\n")
    except READ_ERRORS as exc:
        yield broken_off(index, line_no + 1, exc)


UNREADABLE = "UNREADABLE"
"""The error code of the row that stands for the rest of a source that breaks off."""


def broken_off(index: int, line: int, exc: BaseException) -> RawRow:
    """The row in place of a source's rest, from the line it broke off at (a damaged gzip)."""
    return RawRow(index, line, None, RowError(UNREADABLE, f"source cannot be read further: {exc}"))


def _refuse_json_array(line: bytes, line_no: int, name: str) -> None:
    """Stop at the opening of a JSON array written over several lines: a first line that
    opens with `[` and is not JSON on its own (a whole array on one line is a row, rejected
    as not an object)."""
    if not line.lstrip().startswith(b"["):
        return
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        raise SourceError(
            f"{name}: line {line_no}: a JSON array over several lines, not JSON Lines "
            "(one object per line)",
            hint="convert it, e.g. with jq -c '.[]' FILE > FILE.jsonl",
        ) from None


def skip_rest_of_line(stream: IO[bytes], seen: Callable[[bytes], object] | None = None) -> None:
    """Read past the end of the current line, a piece at a time, each handed to `seen`."""
    while True:
        part = stream.readline(_SKIP_CHUNK)
        if seen is not None:
            seen(part)
        if not part or part.endswith(b"\n"):
            return


def parse_json_line(line: bytes, index: int, line_no: int) -> RawRow:
    """One line as a row: its object, or why it is not one."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return RawRow(index, line_no, None, _json_error(line, exc))
    if may_hold_huge_int(line):
        # orjson would have read such a number as a float: the message would not arrive
        # unchanged. Python's parser, which reads it exactly, stops at fewer levels.
        try:
            huge = _has_huge_int(json.loads(line))
        except RecursionError:
            return RawRow(
                index,
                line_no,
                None,
                RowError("TOO_DEEP", "line is nested too deeply for its numbers to be checked"),
            )
        if huge:
            return RawRow(
                index,
                line_no,
                None,
                RowError(
                    "NUMBER_TOO_LARGE", "a number does not fit in 64 bits and would be altered"
                ),
            )
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "null"
        kind = {"list": "an array", "str": "a string", "int": "a number", "float": "a number"}.get(
            kind, kind
        )
        return RawRow(
            index, line_no, None, RowError("NOT_AN_OBJECT", f"line is {kind}, not a JSON object")
        )
    return RawRow(index, line_no, data, nulls=b"null" in line)


# Only a line with a run of 19 or more digits can hold an integer beyond 64 bits. Mapping
# every digit to "0" and every other byte to " " and looking for 19 zeros is a tenth of the
# cost of the regular expression \d{19}.
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_DIGIT_RUN = b"0" * 19


def may_hold_huge_int(text: bytes) -> bool:
    """Whether JSON text may hold an integer beyond 64 bits, which orjson reads as a float."""
    return _DIGIT_RUN in text.translate(_DIGITS)


def _has_huge_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return any(_has_huge_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_huge_int(v) for v in value)
    return False


def _json_error(line: bytes, exc: orjson.JSONDecodeError) -> RowError:
    text = str(exc)
    if "recursion" in text.lower() or "depth limit" in text.lower():
        return RowError("TOO_DEEP", "line is nested too deeply (more than 1024 levels)")
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return RowError("INVALID_UTF8", f"line is not valid UTF-8 (byte {bad.start + 1})")
    return RowError("INVALID_JSON", f"line is not valid JSON: {text}")
