"""Signals: Ctrl-C and SIGTERM stop a run gracefully; a second one stops it sooner, a third
at once."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import ExitStatus


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block (plain blocking code), SIGTERM interrupts like Ctrl-C does."""
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM wait: the block runs to its end, then the
    interruption is raised as KeyboardInterrupt. For short work that must not be cut."""
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if caught:
        raise KeyboardInterrupt


def install_async_signals(
    stop: Callable[[], None], mark: Callable[[], None], hurry: Callable[[], None]
) -> Callable[[], None]:
    """First Ctrl-C or SIGTERM: stop taking work, settle what is in flight. Second: abandon
    what is in flight (the outputs are still written). Third: leave now, without them (the
    ledger commits per answer, so it stays consistent). Returns the undo."""
    if not _in_main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    seen: list[bool] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler() -> None:
        seen.append(True)
        if len(seen) == 1:
            mark()
            stop()
        elif len(seen) == 2:
            hurry()
        else:
            os._exit(ExitStatus.INTERRUPTED)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler)

    def restore() -> None:
        # asyncio puts back the defaults (SIGTERM's kills the process), not what was there.
        for sig, before in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, before)

    return restore
