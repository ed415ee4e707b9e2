"""Read CSV sources: a header row, then one record per row, each with the physical line where
it starts (a quoted cell may span lines). Text is decoded line by line, so one stray byte
rejects one record instead of ending the import."""

from __future__ import annotations

import codecs
import csv
import io
import typing
from collections.abc import Iterator
from typing import IO

from .errors import SourceError
from .read import READ_ERRORS, RawRow, RowError, skip_rest_of_line

_DELIMITERS = (",", ";", "\t", "|")
_SKIP_CHARS = 1 << 20


def _stand_in(quotes: int) -> str:
    """A line in place of one too long, not blank (so that the record it stands for is
    reported) and opening or closing a quoted cell as the line did, so that the records
    after it are read as they are."""
    return '"\n' if quotes % 2 else " \n"


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


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
    except READ_ERRORS as exc:
        raise SourceError(f"{name}: cannot be read: {exc}") from exc
    sep = delimiter or max(_DELIMITERS, key=lambda d: (first.count(d), d == ","))
    csv.field_size_limit(max(max_line_bytes, 131072))
    reader = csv.reader(lines, delimiter=sep, strict=True)
    header: list[str] | None = None
    while True:
        start = lines.count + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except READ_ERRORS as exc:  # a damaged gzip source: what was read before counts
            if header is None:
                raise SourceError(f"{name}: cannot be read: {exc}") from exc
            yield RawRow(
                index,
                start,  # the record being read when the source broke off
                None,
                RowError("UNREADABLE", f"source cannot be read further: {exc}"),
            )
            return
        except csv.Error as exc:
            if header is None:
                raise SourceError(
                    f"{name}: line {start}: the header row is not valid CSV: {exc}"
                ) from exc
            yield RawRow(
                index, start, None, RowError("INVALID_CSV", f"record is not valid CSV: {exc}")
            )
            continue
        if not cells:
            continue  # a blank line
        problem = lines.problem(start, lines.count)
        if header is None:
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
        if self._utf16 or (encoding and codecs.lookup(encoding).name not in ("utf-8", "utf-8-sig")):
            # Other encodings are decoded as a stream: a bad byte becomes U+FFFD.
            self._wrapper = io.TextIOWrapper(
                typing.cast(typing.BinaryIO, stream),
                encoding=encoding or "utf-16",
                errors="replace",
                newline="",
            )

    def peek_first(self) -> str:
        line = self._next_line()
        if line is not None:
            self._pending.append(line)
        return line or ""

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._pending.pop() if self._pending else self._next_line()
        if line is None:
            raise StopIteration
        self.count += 1
        return line

    def _next_line(self) -> str | None:
        number = self.count + len(self._pending) + 1
        if self._wrapper is not None:
            return self._next_text_line(self._wrapper, number)
        if self._done:
            return None
        raw = self._stream.readline(self._max + 2)  # room for "\r\n"
        if not raw:
            return None
        if len(raw) - (2 if raw.endswith(b"\r\n") else raw.endswith((b"\n", b"\r"))) > self._max:
            quotes = raw.count(b'"')
            if not raw.endswith(b"\n"):
                quotes += skip_rest_of_line(self._stream, b'"')
            self._bad[number] = RowError("LINE_TOO_LONG", f"line is longer than {self._max} bytes")
            return _stand_in(quotes)
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._bad[number] = RowError(
                "INVALID_UTF8", f"line {number} is not valid UTF-8 (byte {exc.start + 1})"
            )
            return raw.decode("utf-8", "replace")

    def _next_text_line(self, wrapper: io.TextIOWrapper, number: int) -> str | None:
        """A line of another encoding than UTF-8; its length is counted in characters."""
        line = wrapper.readline(self._max + 2)  # room for "\r\n"
        if not line:
            # Hand the byte stream back, or closing the wrapper would close it too.
            wrapper.detach()
            self._wrapper = None
            self._done = True
            return None
        if len(line) - (2 if line.endswith("\r\n") else line.endswith(("\n", "\r"))) > self._max:
            quotes = line.count('"')
            if len(line) == self._max + 2 and not line.endswith("\n"):  # the rest, unread
                while (part := wrapper.readline(_SKIP_CHARS)) and not part.endswith(("\n", "\r")):
                    quotes += part.count('"')
                quotes += part.count('"')
            self._bad[number] = RowError(
                "LINE_TOO_LONG", f"line is longer than {self._max} characters"
            )
            return _stand_in(quotes)
        if number == 1:
            line = line.lstrip("\ufeff")
        return line

    def problem(self, start: int, end: int) -> RowError | None:
        for line in range(start, end + 1):
            if line in self._bad:
                return self._bad.pop(line)
        return None
