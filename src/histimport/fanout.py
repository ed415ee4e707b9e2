"""Run a function over batches in forked worker processes, results in input order.

Parsing and validating a JSONL row costs about three times what staging it does, so while
the main process reads and stages, workers check (bench/README.md has the figures).

Workers are forked, so the function needs no pickling and nothing is imported again. Each
keeps only its two pipe ends open (an orphan never holds the ledger's lock or files) and
dies with the main process; if one dies first, its batch is done in the main process. Each
has at most one batch in hand: the main process writes a batch only to an idle worker, which
is reading, so the two never wait on each other's full pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
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


class Fanout:
    """`workers` forked processes applying `work` to batches; use as a context manager."""

    def __init__(self, work: Callable[[Any], Any], workers: int) -> None:
        self._work = work
        self._workers: list[tuple[int, int, int]] = []  # (pid, to worker, from worker)
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
        (killed, out of memory) is dropped and its batch done here; with none left, the rest
        is done here. A worker gets its next batch before its last result is handed on, so
        that it works while the caller uses that result."""
        pending = iter(batches)
        idle = deque(self._workers)
        busy: deque[tuple[tuple[int, int, int] | None, Any]] = deque()  # None: do it here

        def feed() -> None:
            while idle or (not self._workers and not busy):
                batch = next(pending, _END)
                if batch is _END:
                    return
                worker = idle.popleft() if idle else None
                if worker is not None:
                    try:
                        _send(worker[1], pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
                    except OSError:
                        self._drop(worker)
                        worker = None
                busy.append((worker, batch))

        feed()
        while busy:
            result = self._result(*busy.popleft(), idle)
            feed()
            yield result

    def _result(self, worker: tuple[int, int, int] | None, batch: Any, idle: deque[Any]) -> Any:
        if worker is None:
            return self._work(batch)
        try:
            ok, value = pickle.loads(_read_message(worker[2]))
        except (EOFError, OSError, pickle.UnpicklingError, ValueError):
            self._drop(worker)
            return self._work(batch)
        idle.append(worker)
        if not ok:
            raise value
        return value

    def _drop(self, worker: tuple[int, int, int]) -> None:
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
        with warnings.catch_warnings():
            # Python 3.12 warns of forking with threads; the worker runs no code that takes a
            # lock another thread could hold (it parses, validates and writes to its pipe).
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the worker, which never returns
            _serve(self._work, down_r, up_w)
        os.close(down_r)
        os.close(up_w)
        return pid, down_w, up_r


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
                answer = (True, work(pickle.loads(data)))
            except Exception as exc:  # noqa: BLE001 - the main process raises it
                answer = (False, exc)
            _send(sink, pickle.dumps(answer, pickle.HIGHEST_PROTOCOL))
        code = 0
    finally:
        os._exit(code)


def _die_with_parent() -> None:  # pragma: no cover - runs in the worker
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call above took effect
        os._exit(1)


def _send(fd: int, data: bytes) -> None:
    view = memoryview(_HEADER.pack(len(data)) + data)
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
