"""The exception tree, and the exit codes it maps to.

    HistimportError            every error the tool reports to its user
     +-- UsageError            bad option, unreadable source, missing base URL   -> exit 2
     |    +-- SourceError      a source that cannot be opened or read
     +-- AbortError            the run must stop now                             -> exit 3
     |    +-- AuthError        the platform refused the credentials
     |    +-- LedgerError      the state ledger is unusable
     |    +-- OutputError      the failed file or the report cannot be written
     +-- InvariantError        the tool's own accounting does not add up (a bug)

A bad *row* is never an exception: it becomes a rejected record with its location.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Process exit codes, as README.md documents them."""

    OK = 0
    INCOMPLETE = 1
    USAGE = 2
    ABORTED = 3
    INTERRUPTED = 130


class HistimportError(Exception):
    """Base of every error shown to a user: a message and, where useful, a hint."""

    exit_status = ExitStatus.USAGE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(HistimportError):
    """A bad option or configuration: nothing was sent."""


class SourceError(UsageError):
    """A source that cannot be opened or read."""


class AbortError(HistimportError):
    """The run stopped early; what was not sent is listed as notSent."""

    exit_status = ExitStatus.ABORTED


class AuthError(AbortError):
    """The platform answered 401 or 403."""


class LedgerError(AbortError):
    """The state ledger cannot be opened or written."""


class OutputError(AbortError):
    """The failed file or the report could not be written at the end of a run; the ledger
    holds the outcomes, and the same command run again writes them."""


class InvariantError(HistimportError):
    """The run's counts do not add up: a defect in the tool, never in the data."""

    exit_status = ExitStatus.INCOMPLETE
