"""Run configuration: one frozen, keyword-only object with every default in one place."""

from __future__ import annotations

import codecs
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError


class SourceFormat(enum.StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a load, retry or validate run needs besides its sources."""

    base_url: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sandbox: bool = False
    chunk_size: int = 100
    max_request_bytes: int = 1_048_576
    concurrency: int = 8
    rate: float | None = None
    max_attempts: int = 6
    timeout: float = 30.0
    give_up_after: float = 120.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    callback_url: str | None = None
    notify: bool = False
    failed_out: Path = Path("failed.json")
    report: Path | None = None
    accepted_out: Path | None = None
    out_dir: Path | None = None
    state_dir: Path = Path(".histimport")
    map_file: Path | None = None
    unordered: bool = False
    allow_insecure_http: bool = False
    ca_bundle: Path | None = None
    format: str | None = None
    delimiter: str | None = None
    encoding: str | None = None
    max_line_bytes: int = 8 * 1024 * 1024
    check_workers: int | None = None
    generate_source_uuid: bool = False
    strict: bool = False
    dry_run: bool = False
    fresh: bool = False
    shard: tuple[int, int] | None = None
    max_response_bytes: int = 16 * 1024 * 1024
    quiet: bool = False
    log_format: LogFormat = LogFormat.TEXT
    progress_interval: float = 10.0

    def __post_init__(self) -> None:
        # The Python API takes str paths too.
        for name in (
            "failed_out",
            "report",
            "accepted_out",
            "out_dir",
            "state_dir",
            "map_file",
            "ca_bundle",
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

        checks = [
            (self.chunk_size >= 1, "--chunk-size must be at least 1"),
            (self.max_request_bytes >= 256, "--max-request-bytes must be at least 256"),
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (
                self.rate is None or (self.rate > 0 and math.isfinite(self.rate)),
                "--rate must be a positive number",
            ),
            (self.max_attempts >= 1, "--max-attempts must be at least 1"),
            (self.timeout > 0, "--timeout must be positive"),
            (
                self.give_up_after > 0 and math.isfinite(self.give_up_after),
                "--give-up-after must be a positive number of seconds",
            ),
            (
                self.progress_interval > 0 and math.isfinite(self.progress_interval),
                "--progress-interval must be a positive number of seconds",
            ),
            (self.max_line_bytes >= 1024, "--max-line-bytes must be at least 1024"),
            (
                self.check_workers is None or 0 <= self.check_workers <= 64,
                "--check-workers must be between 0 and 64",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.delimiter is not None and (
            len(self.delimiter) != 1 or not self.delimiter.isascii()
        ):
            raise UsageError(f"--delimiter must be one ASCII character, not {self.delimiter!r}")
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise UsageError(f"--encoding {self.encoding!r} is not a known encoding") from None
            try:
                "".encode(self.encoding)
            except LookupError:  # hex, rot13, zlib...: codecs, but not of text
                raise UsageError(f"--encoding {self.encoding!r} is not a text encoding") from None
