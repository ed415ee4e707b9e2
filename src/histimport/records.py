"""The records the pipeline's stages hand each other: a message waiting to be sent, the
platform's word on it, where it stands, and a line of the failed file. The ledger stores
them; the policy, the chunking, the delivery and the outputs read them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple


class State(IntEnum):
    """Where a staged message stands. PENDING or IN_FLIGHT at the end of a run: notSent."""

    PENDING = 0
    ACCEPTED = 1
    FAILED = 2
    ALREADY_ACCEPTED = 3
    IN_FLIGHT = 4


class Pending(NamedTuple):
    """A staged message waiting to be sent. (Tuples: a hundred thousand of them are built in
    a run, at a third of a frozen dataclass's cost.)"""

    id: int
    source_uuid: str
    body: bytes


class Outcome(NamedTuple):
    """The final word on one message of a request."""

    id: int
    source_uuid: str
    state: State
    http_status: int | None = None
    retryable: bool = False
    errors: tuple[dict[str, Any], ...] = ()
    message_uuid: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """One line of the failed file, before the source index is turned into its path."""

    source: int
    line: int
    source_uuid: str | None
    department: str | None
    customer: str | None
    stage: str
    retryable: bool
    http_status: int | None
    errors: list[dict[str, Any]]
