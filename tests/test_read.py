"""The JSONL reader: exact line numbers, bad lines as rows with errors, gzip and stdin."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pytest

from histimport.errors import SourceError
from histimport.read import Source, detect_format, open_source, read_jsonl
from histimport.read_csv import _Quotes


def rows_of(data: bytes, max_line_bytes: int = 1024):
    return list(read_jsonl(io.BufferedReader(io.BytesIO(data)), 0, max_line_bytes=max_line_bytes))


def test_line_numbers_are_physical_and_blank_lines_are_skipped() -> None:
    rows = rows_of(b'{"a":1}\n\n   \n{"b":2}\r\n{"c":3}')
    assert [(r.line, r.data) for r in rows] == [(1, {"a": 1}), (4, {"b": 2}), (5, {"c": 3})]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b'{"a": 1', "INVALID_JSON"),
        (b"[1, 2]", "NOT_AN_OBJECT"),
        (b'"text"', "NOT_AN_OBJECT"),
        (b'{"a": "\xff\xfe"}', "INVALID_UTF8"),
        (b"[" * 5000 + b"]" * 5000, "TOO_DEEP"),
    ],
)
def test_bad_lines_become_rows_with_errors(line: bytes, code: str) -> None:
    (row,) = rows_of(b'{"ok": 1}\n' + line + b"\n", max_line_bytes=1 << 20)[1:]
    assert row.line == 2
    assert row.data is None
    assert row.error is not None and row.error.code == code


def test_a_line_over_the_limit_is_rejected_and_the_next_line_still_counts() -> None:
    rows = rows_of(b'{"a": "' + b"x" * 5000 + b'"}\n{"b": 1}\n', max_line_bytes=1024)
    assert rows[0].error is not None and rows[0].error.code == "LINE_TOO_LONG"
    assert (rows[1].line, rows[1].data) == (2, {"b": 1})


def test_a_byte_order_mark_is_tolerated() -> None:
    assert rows_of(b'\xef\xbb\xbf{"a": 1}\n')[0].data == {"a": 1}


def test_gzip_is_detected_by_content_and_hashed_as_stored(tmp_path: Path) -> None:
    path = tmp_path / "export.jsonl"  # no .gz suffix on purpose
    compressed = gzip.compress(b'{"a": 1}\n{"a": 2}\n')
    path.write_bytes(compressed)
    source = Source(path=str(path), format="jsonl")
    with open_source(source) as stream:
        rows = list(read_jsonl(stream, 0, max_line_bytes=1024))
        while stream.read(1 << 16):
            pass
    assert [r.data for r in rows] == [{"a": 1}, {"a": 2}]
    import hashlib

    assert source.sha256 == hashlib.sha256(compressed).hexdigest()
    assert source.size == len(compressed)


def test_format_detection() -> None:
    assert detect_format("a.jsonl.gz", None) == "jsonl"
    assert detect_format("a.NDJSON", None) == "jsonl"
    with pytest.raises(SourceError, match="needs --format"):
        detect_format("-", None)
    with pytest.raises(SourceError, match="cannot tell"):
        detect_format("export.txt", None)


@pytest.mark.parametrize(
    ("inside", "pieces", "ends_inside"),
    [
        (False, ['a,"b,c'], True),
        (False, ['27" monitor,x'], False),  # a quote inside an unquoted cell is a character
        (False, ['"a""b",c'], False),
        (False, ['"a"",b'], True),  # two quotes: one quote, the cell still open
        (False, ['x,"a"', '"b"'], False),  # the two quotes split between two pieces
        (False, ['x,"a', '",y'], False),
        (False, ["x,", '"a'], True),  # a cell starting at a piece's start
        (True, ['more text",x'], False),
        (True, ['text "" more'], True),
        (True, ['x"'], False),
        (True, ["no quotes"], True),
    ],
)
def test_a_line_s_quotes_are_read_as_the_csv_module_reads_them(
    inside: bool, pieces: list[str], ends_inside: bool
) -> None:
    quotes = _Quotes(",", inside=inside)
    for piece in pieces:
        quotes.feed(piece)
    assert quotes.end() is ends_inside
    # The csv module agrees: a line ending inside a cell joins the next line to its record.
    text = ('"' if inside else "") + "".join(pieces) + '\nz"\nlast\n'
    assert (len(list(csv.reader(io.StringIO(text)))) == 2) is ends_inside


@pytest.mark.parametrize(
    ("inside", "line"),
    [
        (True, 'a"x,"b'),  # something other than a delimiter after the closing quote
        (False, '""a,"b'),
        (False, 'a\rb,"c'),  # a lone carriage return outside a quoted cell
    ],
)
def test_a_line_the_csv_module_gives_up_on_ends_outside_a_cell(inside: bool, line: str) -> None:
    """The csv module raises on it and reads the next line as a new record."""
    quotes = _Quotes(",", inside=inside)
    quotes.feed(line)
    assert quotes.end() is False
    with pytest.raises(csv.Error):
        list(csv.reader(io.StringIO(('"' if inside else "") + line + "\n"), strict=True))
