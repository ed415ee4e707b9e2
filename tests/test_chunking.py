"""Chunking as rows are read: full chunks handed on at once, partial ones at a source's end,
what waits beyond the memory budget spilled to the state dir and deleted once read back."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

import histimport.chunking as chunking_module
from histimport.batch import Chunk, Envelope
from histimport.chunking import SPILL_PREFIX, Chunker, Spill
from histimport.records import Pending

ENVELOPE = Envelope(None)


def message(n: int, size: int = 50) -> Pending:
    return Pending(n, f"uuid-{n:05d}", b'{"n":%d,"pad":"%s"}' % (n, b"x" * size))


def chunker(
    handed: list[Chunk], *, chunk_size: int = 10, max_bytes: int = 1 << 20, **options: object
) -> Chunker:
    return Chunker(
        handed.append,
        chunk_size=chunk_size,
        max_bytes=lambda: max_bytes,
        envelope=ENVELOPE,
        **options,  # type: ignore[arg-type]
    )


def test_a_full_chunk_is_handed_on_as_soon_as_it_is_full() -> None:
    handed: list[Chunk] = []
    chunks = chunker(handed, chunk_size=3)
    for n in range(5):
        chunks.add("d", "a" if n < 3 else "b", message(n))
        if n == 2:
            assert [[m.id for m in c.messages] for c in handed] == [[0, 1, 2]]
    assert len(handed) == 1 and chunks.waiting == 2
    chunks.flush()
    assert [(c.customer, [m.id for m in c.messages]) for c in handed] == [
        ("a", [0, 1, 2]),
        ("b", [3, 4]),
    ]
    assert chunks.waiting == 0


def test_a_chunk_is_cut_by_bytes_too() -> None:
    handed: list[Chunk] = []
    one = ENVELOPE.size([message(0)])
    chunks = chunker(handed, chunk_size=100, max_bytes=one * 2)
    for n in range(5):
        chunks.add("d", "a", message(n))
    chunks.flush()
    assert [len(c.messages) for c in handed] == [2, 2, 1]
    assert all(ENVELOPE.size(c.messages) <= one * 2 for c in handed)


def test_what_waits_beyond_the_budget_spills_and_comes_back_whole_and_in_order(
    tmp_path: Path,
) -> None:
    handed: list[Chunk] = []
    spill = Spill(tmp_path)
    chunks = chunker(handed, chunk_size=40, spill=spill, held_bytes=2_000)
    customers = 7
    for n in range(customers * 40):  # interleaved: no chunk is full before the end
        chunks.add("d", f"c{n % customers}", message(n))
    assert spill.written > 0
    assert len(handed) == customers
    for chunk in handed:
        ids = [m.id for m in chunk.messages]
        assert ids == sorted(ids) and len(ids) == 40
        assert {n % customers for n in ids} == {int(chunk.customer[1:])}
        assert all(m == message(m.id) for m in chunk.messages)  # bodies intact
    # Read back, every spill file but the one still written to is gone; closed, none is.
    assert len(list(tmp_path.glob(f"{SPILL_PREFIX}*"))) <= 1
    spill.close()
    assert not list(tmp_path.glob(f"{SPILL_PREFIX}*"))


def test_a_large_spill_is_compressed_harder_and_comes_back_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts are compressed with LZ4 while the spill on disk is small, with zlib beyond:
    a customer's parts in both codecs come back whole and in order."""
    monkeypatch.setattr(chunking_module, "_FAST_BYTES", 1_500)
    used: list[str] = []
    for name, module in (("lz4", chunking_module.lz4.block), ("zlib", chunking_module.zlib)):

        def counted(data: bytes, *args: Any, _name: str = name, _f: Any = module.compress) -> Any:
            used.append(_name)
            return _f(data, *args)

        monkeypatch.setattr(module, "compress", counted)
    handed: list[Chunk] = []
    spill = Spill(tmp_path)
    chunks = chunker(handed, chunk_size=60, spill=spill, held_bytes=1_500)
    for n in range(5 * 60):  # interleaved: every customer's chunk is full at the end
        chunks.add("d", f"c{n % 5}", message(n))
    assert used[0] == "lz4" and "zlib" in used
    assert sorted(c.customer for c in handed) == [f"c{k}" for k in range(5)]
    for chunk in handed:
        assert [m.id for m in chunk.messages] == list(range(int(chunk.customer[1:]), 300, 5))
        assert all(m == message(m.id) for m in chunk.messages)  # bodies intact
    spill.close()


def test_spill_files_are_deleted_as_they_are_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunking_module, "_SEGMENT_BYTES", 20_000)
    handed: list[Chunk] = []
    spill = Spill(tmp_path)
    chunks = chunker(handed, chunk_size=30, spill=spill, held_bytes=1_000)
    for n in range(600):  # five customers, then five others, and so on
        chunks.add("d", f"c{n % 5 + 5 * (n // 150)}", message(n))
    assert len(handed) == 20
    made = int(spill._number)
    # The files of the customers read back went while the others' were written.
    assert made > 2 and len(list(tmp_path.glob(f"{SPILL_PREFIX}*"))) < made
    spill.close()
    assert not list(tmp_path.glob(f"{SPILL_PREFIX}*"))


def on_disk(folder: Path) -> int:
    return sum(path.stat().st_blocks * 512 for path in folder.glob(f"{SPILL_PREFIX}*"))


def test_the_blocks_of_a_customer_s_parts_are_given_back_as_they_are_read(
    tmp_path: Path,
) -> None:
    """Each customer's parts lie in extents of its own: read back, its blocks go at once,
    however the customers' parts were interleaved."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 8192)
    with probe.open("r+b") as held:
        if not chunking_module._punch_hole(held.fileno(), 0, 4096):
            pytest.skip("this file system cannot give blocks back (no hole punching)")
    spill = Spill(tmp_path)
    last: dict[str, Any] = {"a": None, "b": None}
    room: dict[str, Any] = {"a": None, "b": None}
    for n in range(60):  # incompressible bodies of 3,000 bytes, a customer each in turn
        key = "ab"[n % 2]
        body = random.Random(n).randbytes(3000)
        last[key], room[key] = spill.write([Pending(n, f"u{n}", body)], last[key], room[key])
    before = on_disk(tmp_path)
    assert [m.id for m in spill.read(last["a"])] == list(range(0, 60, 2))
    assert on_disk(tmp_path) < before * 0.6
    assert [m.id for m in spill.read(last["b"])] == list(range(1, 60, 2))
    assert on_disk(tmp_path) < before * 0.1
    spill.close()


def test_short_reads_of_the_spill_are_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read may return fewer bytes than asked (Linux: at most about 2 GiB at once)."""
    real = chunking_module.os.pread
    monkeypatch.setattr(chunking_module.os, "pread", lambda fd, n, at: real(fd, min(n, 7), at))
    spill = Spill(tmp_path)
    first, room = spill.write([message(1), message(2)], None, None)
    second, _ = spill.write([message(3)], first, room)
    assert spill.read(second) == [message(1), message(2), message(3)]
    spill.close()


def test_a_new_run_deletes_the_spill_a_killed_one_left(tmp_path: Path) -> None:
    (tmp_path / f"{SPILL_PREFIX}3").write_bytes(b"left")
    Spill(tmp_path).close()
    assert not list(tmp_path.glob(f"{SPILL_PREFIX}*"))
