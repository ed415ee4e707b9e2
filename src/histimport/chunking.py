"""Chunking: a customer's messages, as they are read, into requests. A chunk is handed on as
soon as it is full (by count or by bytes); a customer's partial chunk waits for more of its
messages, in memory up to a budget, then spilled to the state dir, compressed, and deleted
as soon as it is read back to be sent.
"""

from __future__ import annotations

import ctypes
import functools
import marshal
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import lz4.block

from .batch import Chunk, Envelope, chunks
from .errors import LedgerError
from .records import Pending

SPILL_PREFIX = "spill-"
"""The files of what waits: `spill-1`, `spill-2`..., scratch of the run that wrote them."""
HELD_BYTES = 16 << 20
"""Partial chunks held in memory, in bytes, before the largest ones spill."""
_SEGMENT_BYTES = 64 << 20
"""A spill file is closed at about this size; it is deleted once all it holds was read back."""
_MESSAGE_BYTES = 200
"""What a message held costs in memory beyond its body (its tuple and its ids)."""


Where = tuple[int, int, int]
"""A part of the spill: (file number, offset, size)."""
Room = tuple[int, int, int]
"""What is left of a customer's extent: (file number, offset, end)."""
_BLOCK = 4096
_EXTENT = 2 * _BLOCK
"""A customer's parts go to extents of this size (or of the part's, rounded up to blocks)."""
_LINK = struct.Struct("<IQIB")
"""A part's header: where the part written before it for the same customer is (file 0:
none), so that a customer's parts are found from its last one alone; and its codec."""
_LZ4, _ZLIB = 0, 1
_FAST_BYTES = 32 << 20
"""Spilled bytes on disk below which a part is compressed with LZ4 (a fifth of zlib's CPU);
beyond, with zlib (a third smaller): a spill that large is what brings the state dir near
the export's size, as when many customers wait for their last messages to be read."""


@dataclass(slots=True)
class _Lane:
    """One customer's partial chunk: its spilled part (in order, first) and its held part."""

    count: int = 0
    size: int = 0  # of the request body it would make
    held: list[Pending] = field(default_factory=list)
    held_bytes: int = 0
    spilled: Where | None = None  # the last part spilled; it leads to the ones before
    room: Room | None = None  # what is left of the extent the parts go to


class Spill:
    """Messages that wait, written compressed to numbered files in the state dir, each
    customer's parts in extents of its own, so that reading a customer's parts back gives
    their disk blocks back to the file system at once (where it can: Linux, most file
    systems). A file is deleted once every part written to it was read back."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir
        self._number = 0
        self._file: int | None = None  # the file written to, as a descriptor
        self._size = 0  # of the file written to: where the next extent begins
        self._parts: dict[int, int] = {}  # by file number: parts not read back yet
        self._fds: dict[int, int] = {}
        self.written = 0  # bytes written, for the figures
        self._on_disk = 0  # bytes of the parts not read back yet
        clear_spill(state_dir)

    def write(
        self, messages: list[Pending], before: Where | None, room: Room | None
    ) -> tuple[Where, Room]:
        """Store messages after the part `before` of the same customer, in its extent
        `room` if they fit; where they are, and the room left."""
        packed = marshal.dumps([tuple(m) for m in messages])
        if self._on_disk < _FAST_BYTES:
            codec, packed = _LZ4, lz4.block.compress(packed)
        else:
            codec, packed = _ZLIB, zlib.compress(packed, 1)
        data = _LINK.pack(*(before or (0, 0, 0)), codec) + packed
        if room is None or room[0] not in self._fds or room[1] + len(data) > room[2]:
            room = self._extent(len(data))
        number, at, end = room
        try:
            os.pwrite(self._fds[number], data, at)  # a regular file: written whole or an error
        except OSError as exc:
            raise _cannot(self._dir, exc) from exc
        self._parts[number] += 1
        self.written += len(data)
        self._on_disk += len(data)
        return (number, at, len(data)), (number, at + len(data), end)

    def read(self, last: Where) -> list[Pending]:
        """The messages of a part and of every part before it, in the order written; their
        extents are given back."""
        parts = []
        spans: list[list[int]] = []  # [file, start, end] of the parts read, merged
        where: Where | None = last
        while where is not None:
            before, messages = self._read_part(where)
            parts.append(messages)
            number, at, size = where
            if spans and spans[-1][0] == number and spans[-1][1] == at + size:
                spans[-1][1] = at  # read backwards, the parts of an extent lie downwards
            else:
                spans.append([number, at, at + size])
            where = before
        for number, start, end in spans:
            # An extent begins at a block and is the customer's to its end: so are the
            # blocks its parts began in and ended in.
            start, end = start - start % _BLOCK, -(-end // _BLOCK) * _BLOCK
            if number in self._fds:
                _punch_hole(self._fds[number], start, end - start)
        for number in {number for number, _, _ in spans}:
            if not self._parts.get(number) and number != self._number and number in self._fds:
                self._drop(number)
        return [m for messages in reversed(parts) for m in messages]

    def _extent(self, size: int) -> Room:
        """Room of its own for a customer's parts, at the end of the file written to."""
        if self._file is None or self._size >= _SEGMENT_BYTES:
            self._next_file()
        length = max(_EXTENT, -(-size // _BLOCK) * _BLOCK)
        at = self._size
        self._size += length
        return self._number, at, at + length

    def _read_part(self, where: Where) -> tuple[Where | None, list[Pending]]:
        number, at, size = where
        data = b""
        while len(data) < size:  # a read may return fewer bytes than asked
            try:
                more = os.pread(self._fds[number], size - len(data), at + len(data))
            except OSError as exc:
                raise _cannot(self._dir, exc) from exc
            if not more:
                raise LedgerError(f"{self._path(number)} ends early: the state dir was changed")
            data += more
        file, offset, length, codec = _LINK.unpack_from(data)
        packed = data[_LINK.size :]
        packed = lz4.block.decompress(packed) if codec == _LZ4 else zlib.decompress(packed)
        messages = [Pending(*m) for m in marshal.loads(packed)]
        self._parts[number] -= 1
        self._on_disk -= size
        return ((file, offset, length) if file else None), messages

    def close(self) -> None:
        for number in list(self._fds):
            self._drop(number)
        self._file = None

    def _next_file(self) -> None:
        if self._file is not None and not self._parts[self._number]:
            self._drop(self._number)
        self._number += 1
        path = self._path(self._number)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise _cannot(self._dir, exc) from exc
        self._file = self._fds[self._number] = fd
        self._size = 0
        self._parts[self._number] = 0

    def _drop(self, number: int) -> None:
        os.close(self._fds.pop(number))
        self._parts.pop(number, None)
        if number == self._number:
            self._file = None
        self._path(number).unlink(missing_ok=True)

    def _path(self, number: int) -> Path:
        return self._dir / f"{SPILL_PREFIX}{number}"


_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (Linux)


@functools.cache
def _fallocate() -> Callable[..., int] | None:
    """libc's fallocate, where there is one."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return cast(Callable[..., int], function)


def _punch_hole(fd: int, at: int, size: int) -> bool:
    """Give the disk blocks of a part read back to the file system at once (where it can:
    Linux, most file systems), before its whole file goes; whether it did."""
    fallocate = _fallocate()
    return fallocate is not None and fallocate(fd, _PUNCH_HOLE, at, size) == 0


def clear_spill(state_dir: Path) -> None:
    """Delete the spill files a run left (killed, it could not): they are scratch."""
    for path in state_dir.glob(f"{SPILL_PREFIX}*"):
        path.unlink(missing_ok=True)


def _cannot(state_dir: Path, exc: OSError) -> LedgerError:
    return LedgerError(
        f"state dir {state_dir}: cannot write: {exc.strerror or exc}",
        hint="free some disk space (or fix the state dir) and run the same command "
        "again: it resumes from what was committed",
    )


Sink = Callable[[Chunk], None]


class Chunker:
    """Cuts each customer's messages, in the order they come, into chunks of at most
    `chunk_size` messages and `max_bytes()` of body, handing each one to `sink` as soon as
    it is full. `flush` hands on the partial ones (a source ended)."""

    def __init__(
        self,
        sink: Sink,
        *,
        chunk_size: int,
        max_bytes: Callable[[], int],
        envelope: Envelope,
        spill: Spill | None = None,
        held_bytes: int = HELD_BYTES,
    ) -> None:
        self._sink = sink
        self._chunk_size = chunk_size
        self._max_bytes = max_bytes
        self._envelope = envelope
        self._spill = spill
        self._budget = held_bytes
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._held = 0  # bytes held in memory, over every lane

    def add(self, department: str, customer: str, message: Pending) -> None:
        key = (department, customer)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(size=self._envelope.overhead)
        extra = len(message.body) + (1 if lane.count else 0)
        # (A lane is handed on as soon as it has chunk_size messages: only bytes are left.)
        if lane.count and lane.size + extra > self._max_bytes():
            self._hand_on(key, lane)
            lane = self._lanes[key] = _Lane(size=self._envelope.overhead)
            extra = len(message.body)
        lane.held.append(message)
        lane.count += 1
        lane.size += extra
        cost = len(message.body) + _MESSAGE_BYTES
        lane.held_bytes += cost
        self._held += cost
        if lane.count >= self._chunk_size:
            self._hand_on(key, lane)
            del self._lanes[key]
        elif self._held > self._budget:
            self._make_room()

    def flush(self) -> None:
        """Hand on every partial chunk, in the order their customers came."""
        lanes, self._lanes = self._lanes, {}
        for key, lane in lanes.items():
            self._hand_on(key, lane)

    @property
    def waiting(self) -> int:
        """Messages in partial chunks."""
        return sum(lane.count for lane in self._lanes.values())

    def _hand_on(self, key: tuple[str, str], lane: _Lane) -> None:
        self._held -= lane.held_bytes
        messages = self._messages(lane)
        department, customer = key
        if lane.size <= self._max_bytes():  # within the limit still: the lane is the chunk
            self._sink(Chunk(department, customer, tuple(messages)))
            return
        # Cut again: a 413 has lowered the limit since these were gathered.
        for chunk in chunks(
            department,
            customer,
            messages,
            chunk_size=self._chunk_size,
            max_bytes=self._max_bytes,
            envelope=self._envelope,
        ):
            self._sink(chunk)

    def _messages(self, lane: _Lane) -> Iterator[Pending]:
        if lane.spilled is not None:
            assert self._spill is not None
            yield from self._spill.read(lane.spilled)
        yield from lane.held

    def _make_room(self) -> None:
        """Over the budget: the lanes holding most spill, until half of it is held."""
        if self._spill is None:
            return
        for lane in sorted(self._lanes.values(), key=lambda lane: -lane.held_bytes):
            if self._held <= self._budget // 2 or not lane.held:
                break
            lane.spilled, lane.room = self._spill.write(lane.held, lane.spilled, lane.room)
            self._held -= lane.held_bytes
            lane.held = []
            lane.held_bytes = 0
