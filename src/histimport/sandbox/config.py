"""Settings of the sandbox server: where it listens, where it stores, which faults it injects."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .limits import LimiterShape

_RATES = ("fail_rate", "error_after_store_rate", "garble_rate", "reject_rate")


class SandboxConfigError(UsageError, ValueError):
    """A sandbox setting out of range (exit 2, like any bad option)."""


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """How the sandbox behaves. Every fault is off by default.

    The three request-level faults (``fail_rate``, ``error_after_store_rate``,
    ``garble_rate``) are exclusive fractions of the requests that reach the
    fault stage, so their sum must not exceed 1. ``reject_rate`` applies to each
    message on its own. All random choices are reproducible from ``seed``.
    """

    host: str = "127.0.0.1"
    #: 0 picks a free port; read the real one from ``RunningSandbox.port``.
    port: int = 8080
    #: SQLite file that keeps the messages across restarts; None = a temporary
    #: file that is removed when the server stops.
    db: Path | None = None
    #: When either is set, requests must carry exactly these Basic credentials.
    username: str | None = None
    password: str | None = None
    #: Requests answered 503 before anything is stored.
    fail_rate: float = 0.0
    #: Requests answered 500 after their messages were stored.
    error_after_store_rate: float = 0.0
    #: Requests answered 200 with an HTML page after their messages were stored.
    garble_rate: float = 0.0
    #: Messages rejected with a per-message REJECTED error (same messages every time).
    reject_rate: float = 0.0
    #: Requests per second over all clients; the excess is answered 429.
    rate_limit: float | None = None
    #: The rate limiter's shape: a token bucket, or a fixed window of each clock second.
    rate_window: LimiterShape = LimiterShape.BUCKET
    #: The token bucket's burst, in requests (default: one second's worth).
    rate_burst: float | None = None
    #: Whether a 429 says when to come back (`Retry-After`), or is bare.
    rate_retry_after: bool = True
    #: Seconds sent as ``Retry-After`` with a 503; None sends no header.
    retry_after: float | None = None
    #: Delay before every answer of the API endpoint.
    latency_ms: float = 0.0
    #: Bodies larger than this are answered 413 without being parsed.
    max_request_bytes: int | None = None
    seed: int = 0
    #: Append every request the endpoint reads (path, headers but Authorization, body) to
    #: this JSONL file: what exactly did the client send?
    journal: Path | None = None
    #: When set, the only departments that exist: any other is answered 404.
    departments: frozenset[str] | None = None
    #: Serve https with this certificate (PEM) and key instead of http.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SandboxConfigError(f"port must be between 0 and 65535, got {self.port}")
        for name in _RATES:
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise SandboxConfigError(f"{name} must be between 0 and 1, got {value}")
        request_faults = self.fail_rate + self.error_after_store_rate + self.garble_rate
        if request_faults > 1.0 + 1e-9:
            raise SandboxConfigError(
                "fail_rate + error_after_store_rate + garble_rate must not exceed 1, "
                f"got {request_faults:g}"
            )
        if self.rate_limit is not None and not (
            math.isfinite(self.rate_limit) and self.rate_limit > 0
        ):
            raise SandboxConfigError(f"rate_limit must be a positive number, got {self.rate_limit}")
        if self.rate_burst is not None and not (
            math.isfinite(self.rate_burst) and self.rate_burst >= 1
        ):
            raise SandboxConfigError(f"rate_burst must be 1 or more, got {self.rate_burst}")
        if self.rate_burst is not None and self.rate_window is LimiterShape.FIXED:
            raise SandboxConfigError("rate_burst is the token bucket's: a fixed window has none")
        if self.retry_after is not None and not (
            math.isfinite(self.retry_after) and self.retry_after >= 0
        ):
            raise SandboxConfigError(
                f"retry_after must be 0 or more seconds, got {self.retry_after}"
            )
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise SandboxConfigError(f"latency_ms must be 0 or more, got {self.latency_ms}")
        if self.max_request_bytes is not None and self.max_request_bytes < 1:
            raise SandboxConfigError(
                f"max_request_bytes must be a positive number, got {self.max_request_bytes}"
            )

    @property
    def requires_auth(self) -> bool:
        """True when requests must present the configured Basic credentials."""
        return self.username is not None or self.password is not None
