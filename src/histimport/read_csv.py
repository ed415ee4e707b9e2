"""Read CSV sources: a header row, then one record per row, each with the physical line where
it starts (a quoted cell may span lines). Text is decoded line by line, so one stray byte
rejects one record instead of ending the import."""

from __future__ import annotations

import codecs
import csv
import io
import re
import typing
from collections.abc import Iterator
from typing import IO

from .errors import SourceError
from .read import READ_ERRORS, RawRow, RowError, broken_off, skip_rest_of_line

_DELIMITERS = (",", ";", "\t", "|")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_SKIP_CHARS = 1 << 20


class _Quotes:
    """Whether a CSV line ends inside a quoted cell, read piece by piece by the csv module's
    rules: a quote opens a cell only at the cell's start, inside one two quotes stand for
    one, and after the quote that closes it only a delimiter may follow. A line that breaks
    a rule (or holds a lone carriage return outside a quoted cell) is one the csv module
    gives up on, starting the next record afresh: it ends outside a cell. Only quotes,
    delimiters and carriage returns matter, so only they are looked at."""

    def __init__(self, sep: str, *, inside: bool) -> None:
        self.inside = inside
        self._sep = sep
        self._tokens = re.compile(f'["\r{re.escape(sep)}]')
        self._quote_at: int | None = None  # inside: a quote that may be the first of two
        self._cell_from: int | None = None if inside else 0  # outside: where a cell begins
        self._offset = 0  # of the piece being read, in the line
        self._broken = False

    def feed(self, piece: str) -> None:
        base = self._offset
        self._offset = base + len(piece)
        if self._broken:
            return
        for token in self._tokens.finditer(piece):
            at, char = base + token.start(), token.group()
            if self._quote_at is not None:
                if at != self._quote_at + 1 or char == "\r":
                    self._broken = True  # the closing quote is followed by something else
                    return
                self._quote_at = None
                if char == '"':
                    continue  # two quotes: one quote, still inside
                self.inside = False  # closed, and followed by a delimiter
                self._cell_from = None
            if self.inside:
                if char == '"':
                    self._quote_at = at
            elif char == "\r":
                self._broken = True
                return
            elif char == self._sep:
                self._cell_from = at + 1
            elif at == self._cell_from:  # a quote opening a cell; elsewhere, a plain character
                self.inside = True

    def end(self) -> bool:
        """Whether the line ended inside a quoted cell."""
        if self._broken:
            return False
        if self._quote_at is not None:  # a last quote, with nothing after it: it closed
            self._quote_at = None
            self.inside = False
        return self.inside


_READ_ERRORS = (*READ_ERRORS, UnicodeError)
"""What reading may raise; UnicodeError from a decoder that cannot start (UTF-16 with no
byte-order mark) or that --encoding names but cannot decode a stream (idna)."""


def _unreadable(name: str, exc: BaseException) -> SourceError:
    hint = None
    if isinstance(exc, UnicodeError):
        hint = "check --encoding (for UTF-16 without a byte-order mark: utf-16-le or utf-16-be)"
    return SourceError(f"{name}: cannot be read: {exc}", hint=hint)


_LONE_CR = "new-line character seen in unquoted field"
_TOO_LARGE = "field larger than field limit"
_LONE_CR_HINT = (
    "lines that end in a lone \\r (as in old Mac files) must end in \\n or \\r\\n: "
    "convert them, e.g. with tr '\\r' '\\n' < FILE > FIXED.csv"
)
_LONE_CR_AT = re.compile(rb"\r(?!\n)")


def _plain(exc: csv.Error) -> str:
    """The csv module's words, but for one that speaks of how Python opens files."""
    text = str(exc)
    if _LONE_CR in text:
        return "a carriage return (\\r) that does not end a line stands outside quotes"
    if _TOO_LARGE in text:
        return f"a quoted cell is longer than {csv.field_size_limit()} characters"
    return text


def _stand_in(inside: bool, ends_inside: bool) -> str:
    """A line in place of one too long: not blank (so that the record it stands for is
    reported), and opening or closing a quoted cell as that line did, so that the records
    after it are read as they are."""
    return '"\n' if inside != ends_inside else " \n"


def read_csv(
    stream: IO[bytes],
    index: int,
    *,
    max_line_bytes: int,
    delimiter: str | None = None,
    encoding: str | None = None,
    name: str = "source",
) -> Iterator[RawRow]:
    """Yield the header (a row with `header` set), then one row per record with `data`
    mapping header -> cell text. A header that cannot be read is a SourceError: without
    it no record can be."""
    try:
        lines = _Lines(stream, max_line_bytes, encoding)
        first = lines.peek_first()
    except _READ_ERRORS as exc:
        raise _unreadable(name, exc) from exc
    sep = delimiter or max(_DELIMITERS, key=lambda d: (first.count(d), d == ","))
    lines.sep = sep
    csv.field_size_limit(max(max_line_bytes, 131072))
    reader = csv.reader(lines, delimiter=sep, strict=True)
    header: list[str] | None = None
    while True:
        start = lines.count + 1
        lines.record_start = True
        try:
            cells = next(reader)
        except StopIteration:
            return
        except _READ_ERRORS as exc:  # a damaged gzip source: what was read before counts
            if header is None:
                raise _unreadable(name, exc) from exc
            yield broken_off(index, start, exc)  # the record being read when it broke off
            return
        except csv.Error as exc:
            if header is None:
                raise SourceError(
                    f"{name}: line {start}: the header row is not valid CSV: {_plain(exc)}",
                    hint=_LONE_CR_HINT if _LONE_CR in str(exc) else None,
                ) from exc
            broken = None
            if _TOO_LARGE in str(exc):
                # The csv module gave up inside a quoted cell: the record ends where the
                # cell does, and the next one starts on the line after.
                try:
                    lines.skip_quoted_cell()
                except _READ_ERRORS as read_error:
                    broken = read_error
            yield RawRow(
                index,
                start,
                None,
                RowError("INVALID_CSV", f"record is not valid CSV: {_plain(exc)}"),
            )
            if broken is not None:  # a damaged source, broken off inside that cell
                yield broken_off(index, lines.count + 1, broken)
                return
            continue
        if not cells:
            continue  # a blank line
        problem = lines.problem(start, lines.count)
        if header is None:
            if problem is not None and lines.lone_cr:
                raise SourceError(
                    f"{name}: line {start}: the header row: {problem.description}, and its "
                    "lines end in a lone carriage return (\\r)",
                    hint=_LONE_CR_HINT,
                )
            if problem is not None:
                raise SourceError(
                    f"{name}: line {start}: the header row: {problem.description}",
                    hint="fix the header (and --encoding, if the file is not UTF-8)",
                )
            header = [c.strip() for c in cells]
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise SourceError(
                    f"{name}: line {start}: column(s) {', '.join(map(repr, repeated))} "
                    "appear more than once in the header"
                )
            yield RawRow(index, start, None, header=header)
            continue
        if problem is not None:
            yield RawRow(index, start, None, problem)
        elif len(cells) != len(header):
            yield RawRow(
                index,
                start,
                None,
                RowError(
                    "INVALID_CSV",
                    f"record has {len(cells)} cells but the header has {len(header)} "
                    f"(a delimiter {sep!r} or a quote out of place?)",
                ),
            )
        else:
            yield RawRow(index, start, dict(zip(header, cells, strict=True)))


class _Lines:
    """Physical lines as text for the csv module, counting them and remembering the ones
    that could not be decoded or were too long."""

    def __init__(self, stream: IO[bytes], max_line_bytes: int, encoding: str | None) -> None:
        self.count = 0
        self._stream = stream
        self._max = max_line_bytes
        self._bad: dict[int, RowError] = {}
        self._pending: list[str] = []
        head = stream.peek(4)[:4] if hasattr(stream, "peek") else b""
        self._utf16 = encoding is None and head[:2] in _UTF16_BOMS
        self._wrapper: io.TextIOWrapper | None = None
        self._done = False
        self._split_crlf = False  # the last text line ended at the limit on "\r"
        self.lone_cr = False  # the first line, too long, holds a lone "\r"
        self._last = ""  # the last line handed out
        self._last_inside = False  # whether it began inside a quoted cell
        self.sep = ","  # the delimiter, once read_csv knows it
        self.record_start = True  # read_csv sets it before it asks for each record
        if self._utf16 or (encoding and codecs.lookup(encoding).name not in ("utf-8", "utf-8-sig")):
            # Other encodings are decoded as a stream: a bad byte becomes U+FFFD.
            self._wrapper = io.TextIOWrapper(
                typing.cast(typing.BinaryIO, stream),
                encoding=encoding or "utf-16",
                errors="replace",
                newline="",
            )

    def peek_first(self) -> str:
        line = self._next_line(inside=False)
        if line is not None:
            self._pending.append(line)
        return line or ""

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        # The csv module asks for a record's first line, then for more only while a quoted
        # cell is open: a line is inside one unless it is the first its record asks for.
        inside = not self.record_start
        self.record_start = False
        line = self._pending.pop() if self._pending else self._next_line(inside=inside)
        if line is None:
            raise StopIteration
        self.count += 1
        self._last = line
        self._last_inside = inside
        return line

    def skip_quoted_cell(self) -> None:
        """Read past the end of the quoted cell that the last line handed out was inside
        of when the csv module gave up on it."""
        line: str | None = self._last
        inside = self._last_inside  # the cell may have begun on that line
        while line is not None:
            quotes = _Quotes(self.sep, inside=inside)
            quotes.feed(line)
            if not quotes.end():
                return
            line = next(self, None)  # as the csv module asks: a line inside the cell
            inside = True

    def _next_line(self, *, inside: bool) -> str | None:
        number = self.count + len(self._pending) + 1
        if self._wrapper is not None:
            return self._next_text_line(self._wrapper, number, inside=inside)
        if self._done:
            return None
        raw = self._stream.readline(self._max + 2)  # room for "\r\n"
        if not raw:
            return None
        if len(raw) - (2 if raw.endswith(b"\r\n") else raw.endswith((b"\n", b"\r"))) > self._max:
            lone = _LONE_CR_AT.search(raw) if number == 1 else None
            if lone is not None and lone.end() < len(raw):  # not a "\r" the limit cut off
                self.lone_cr = True  # lines split on "\n" only: the file reads as one line
            # Quotes and delimiters are ASCII: read as Latin-1, a byte is a character.
            quotes = _Quotes(self.sep, inside=inside)
            quotes.feed(raw.decode("latin-1"))
            if not raw.endswith(b"\n"):
                skip_rest_of_line(self._stream, lambda part: quotes.feed(part.decode("latin-1")))
            self._bad[number] = RowError("LINE_TOO_LONG", f"line is longer than {self._max} bytes")
            return _stand_in(inside, quotes.end())
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._bad[number] = RowError(
                "INVALID_UTF8", f"line {number} is not valid UTF-8 (byte {exc.start + 1})"
            )
            return raw.decode("utf-8", "replace")

    def _next_text_line(
        self, wrapper: io.TextIOWrapper, number: int, *, inside: bool
    ) -> str | None:
        """A line of another encoding than UTF-8; its length is counted in characters."""
        line = wrapper.readline(self._max + 2)  # room for "\r\n"
        if self._split_crlf:
            self._split_crlf = False
            if line == "\n":  # the end of the line before, which ended at the limit on "\r"
                line = wrapper.readline(self._max + 2)
        if not line:
            # Hand the byte stream back, or closing the wrapper would close it too.
            wrapper.detach()
            self._wrapper = None
            self._done = True
            return None
        if len(line) - (2 if line.endswith("\r\n") else line.endswith(("\n", "\r"))) > self._max:
            quotes = _Quotes(self.sep, inside=inside)
            quotes.feed(line)
            if len(line) == self._max + 2 and line.endswith("\r"):
                # A line end, read to the limit: a lone "\r", or the first of "\r\n".
                self._split_crlf = True
            elif len(line) == self._max + 2 and not line.endswith("\n"):  # the rest, unread
                while (part := wrapper.readline(_SKIP_CHARS)) and not part.endswith(("\n", "\r")):
                    quotes.feed(part)
                quotes.feed(part)
                self._split_crlf = part.endswith("\r")
            self._bad[number] = RowError(
                "LINE_TOO_LONG", f"line is longer than {self._max} characters"
            )
            return _stand_in(inside, quotes.end())
        if number == 1:
            line = line.lstrip("\ufeff")
        return line

    def problem(self, start: int, end: int) -> RowError | None:
        for line in range(start, end + 1):
            if line in self._bad:
                return self._bad.pop(line)
        return None
