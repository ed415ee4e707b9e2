"""Run a function over batches in forked worker processes, results in input order.

Parsing and validating a JSONL row costs about three times what staging it does, so while
the main process reads and stages, workers check (bench/README.md has the figures).

Workers are forked, so the function needs no pickling and nothing is imported again. Each
keeps only its two pipe ends open (an orphan never holds the ledger's lock or files) and
dies with the main process; if one dies first, its batches are done in the main process.

What crosses a pipe is marshalled when it can be (plain tuples, lists, numbers, strings and
bytes: a tenth of pickle's cost to write), pickled otherwise.

A worker has two batches in hand at most: while it works on one, the next waits in its
pipe, and it writes its result into a pipe that holds it, so that it goes on without
waiting for the main process to read (waiting, a worker spent a third of its time). Where
pipes cannot be enlarged, or a batch is too large to wait in one, a worker is given a batch
only when it has none: it is then reading, so the two never wait on each other's full pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import marshal
import os
import pickle
import signal
import struct
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_HEADER = struct.Struct("<Q")
_END = object()
_PR_SET_PDEATHSIG = 1
_F_SETPIPE_SZ = 1031  # Linux
_PIPE_BYTES = 1 << 20
"""A worker's pipes are enlarged to this (Linux lets any process go up to 1 MiB)."""
_AHEAD_BYTES = _PIPE_BYTES // 2
"""A batch waits in a busy worker's pipe only if it is no larger: its write never blocks."""


class Fanout:
    """`workers` forked processes applying `work` to batches; use as a context manager."""

    def __init__(self, work: Callable[[Any], Any], workers: int) -> None:
        self._work = work
        self._workers: list[tuple[int, int, int]] = []  # (pid, to worker, from worker)
        self._roomy: dict[tuple[int, int, int], bool] = {}  # its pipes were enlarged
        try:
            for _ in range(workers):
                self._workers.append(self._fork())
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers still running."""
        return [pid for pid, _, _ in self._workers]

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(self, batches: Iterable[Any]) -> Iterator[Any]:
        """`work(batch)` for every batch, in order (once per Fanout). A worker that dies
        (killed, out of memory) is dropped and its batches done here; with none left, the
        rest is done here. A worker is given its next batch before its result is handed on,
        so that it works while the caller uses that result."""
        pending = iter(batches)
        in_hand = dict.fromkeys(self._workers, 0)
        busy: deque[tuple[tuple[int, int, int] | None, Any]] = deque()  # None: do it here
        waiting: tuple[Any, bytes] | None = None  # a batch packed, not yet given

        def taker(size: int) -> tuple[int, int, int] | None:
            """A worker with no batch, else one that may take this one as its second."""
            workers = [w for w in self._workers if in_hand[w] == 0]
            if not workers and size <= _AHEAD_BYTES:
                workers = [w for w in self._workers if in_hand[w] == 1 and self._roomy[w]]
            return workers[0] if workers else None

        def feed() -> None:
            nonlocal waiting
            while True:
                if not self._workers:
                    if waiting is not None:
                        busy.append((None, waiting[0]))
                        waiting = None
                    if busy:
                        return  # one batch at a time, here, as the caller takes results
                    batch = next(pending, _END)
                    if batch is _END:
                        return
                    busy.append((None, batch))
                    continue
                if waiting is None:
                    if all(in_hand[w] >= 1 + self._roomy[w] for w in self._workers):
                        return
                    batch = next(pending, _END)
                    if batch is _END:
                        return
                    waiting = (batch, _message(batch))
                worker = taker(len(waiting[1]))
                if worker is None:
                    return
                batch, data = waiting
                waiting = None
                try:
                    _send(worker[1], data)
                except OSError:
                    self._drop(worker)
                    busy.append((None, batch))
                    continue
                in_hand[worker] += 1
                busy.append((worker, batch))

        feed()
        while busy:
            worker, batch = busy.popleft()
            result = self._result(worker, batch)
            if worker is not None:
                in_hand[worker] -= 1
            feed()
            yield result

    def _result(self, worker: tuple[int, int, int] | None, batch: Any) -> Any:
        if worker is None or worker not in self._workers:
            return self._work(batch)  # here: no worker, or it died with this batch in hand
        try:
            ok, value = _loads(_read_message(worker[2]))
        except (EOFError, OSError, pickle.UnpicklingError, ValueError):
            self._drop(worker)
            return self._work(batch)
        if not ok:
            raise value
        return value

    def _drop(self, worker: tuple[int, int, int]) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
            _stop(worker)

    def close(self) -> None:
        """Stop the workers and reap them."""
        for worker in self._workers:
            _stop(worker)
        self._workers = []

    def _fork(self) -> tuple[int, int, int]:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        roomy = _enlarge(down_w) and _enlarge(up_w)
        with warnings.catch_warnings():
            # Python 3.12 warns of forking with threads; the worker runs no code that takes a
            # lock another thread could hold (it parses, validates and writes to its pipe).
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the worker, which never returns
            _serve(self._work, down_r, up_w)
        os.close(down_r)
        os.close(up_w)
        worker = (pid, down_w, up_r)
        self._roomy[worker] = roomy
        return worker


def _enlarge(fd: int) -> bool:
    """Whether the pipe of `fd` could be made to hold _PIPE_BYTES."""
    try:
        return fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES) >= _PIPE_BYTES
    except OSError:
        return False


def _stop(worker: tuple[int, int, int]) -> None:
    pid, to_worker, from_worker = worker
    for fd in (to_worker, from_worker):
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _serve(work: Callable[[Any], Any], source: int, sink: int) -> None:  # pragma: no cover
    """The worker's loop: read a batch, write its result, until the input closes."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent()
        keep = sorted((source, sink))
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
        while True:
            try:
                data = _read_message(source)
            except EOFError:
                break
            try:
                answer = (True, work(_loads(data)))
            except Exception as exc:  # noqa: BLE001 - the main process raises it
                answer = (False, exc)
            _send(sink, _message(answer))
        code = 0
    finally:
        os._exit(code)


def _die_with_parent() -> None:  # pragma: no cover - runs in the worker
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call above took effect
        os._exit(1)


_MARSHAL, _PICKLE = b"M", b"P"


def _message(value: Any) -> bytes:
    """A value as a message to cross a pipe, its length first: marshalled if it can be,
    pickled otherwise (put together in one copy)."""
    try:
        tag, body = _MARSHAL, marshal.dumps(value)
    except ValueError:  # an object marshal does not know (a dataclass, an exception)
        tag, body = _PICKLE, pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return b"".join((_HEADER.pack(len(tag) + len(body)), tag, body))


def _loads(data: bytes) -> Any:
    body = memoryview(data)[1:]
    if data[:1] == _MARSHAL:
        return marshal.loads(body)
    return pickle.loads(body)


def _send(fd: int, message: bytes) -> None:
    view = memoryview(message)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n:
        part = os.read(fd, min(n, 1 << 20))
        if not part:
            raise EOFError
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_message(fd: int) -> bytes:
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size))
    return _read_exactly(fd, size)
