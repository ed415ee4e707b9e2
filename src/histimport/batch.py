"""Cut a customer's staged messages into requests: at most `chunk_size` messages and at most
`max_bytes` of body each, in input order. Bodies were serialised once, at staging, and are
joined here as bytes: nothing is parsed or serialised again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import orjson

from .records import Pending

_OPEN = b'{"saveMessageRequestList":['


@dataclass(frozen=True, slots=True)
class Chunk:
    """One request's worth of one customer's messages."""

    department: str
    customer: str
    messages: tuple[Pending, ...]

    def halves(self) -> tuple[Chunk, Chunk]:
        mid = len(self.messages) // 2
        return (
            Chunk(self.department, self.customer, self.messages[:mid]),
            Chunk(self.department, self.customer, self.messages[mid:]),
        )


class Envelope:
    """The request body around the messages, with `callBackPathUrl` when one is set."""

    def __init__(self, callback_url: str | None) -> None:
        tail = b"]"
        if callback_url is not None:
            tail += b',"callBackPathUrl":' + orjson.dumps(callback_url)
        self._close = tail + b"}"
        self.overhead = len(_OPEN) + len(self._close)

    def size(self, messages: Sequence[Pending]) -> int:
        """The exact body size of a request carrying these messages."""
        return self.overhead + sum(len(m.body) for m in messages) + max(len(messages) - 1, 0)

    def body(self, messages: Sequence[Pending]) -> bytes:
        return _OPEN + b",".join(m.body for m in messages) + self._close


def chunks(
    department: str,
    customer: str,
    messages: Iterator[Pending],
    *,
    chunk_size: int,
    max_bytes: Callable[[], int],
    envelope: Envelope,
) -> Iterator[Chunk]:
    """Group one customer's messages into chunks; `max_bytes` is read per chunk, as it may
    be lowered during the run (a 413 teaches the real limit)."""
    current: list[Pending] = []
    size = envelope.overhead
    limit = max_bytes()
    for message in messages:
        extra = len(message.body) + (1 if current else 0)
        if current and (len(current) >= chunk_size or size + extra > limit):
            yield Chunk(department, customer, tuple(current))
            current = []
            size = envelope.overhead
            limit = max_bytes()
            extra = len(message.body)
        current.append(message)
        size += extra
    if current:
        yield Chunk(department, customer, tuple(current))
