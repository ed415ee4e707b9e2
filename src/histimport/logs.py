"""Log events for people who read them later: one line each, time-stamped and levelled.

The events go through the standard `logging` module, on the `histimport` logger, so that an
application using histimport as a library routes them as it routes its own. The command line
writes them to stderr: as JSON objects with `--log-format json`, as text lines off a
terminal (on a terminal, the progress display shows the same). An event is a name and its
fields:

    {"time": "2026-12-07T21:14:00.123Z", "level": "info", "event": "progress", ...}
    2026-12-07T21:14:00.123Z INFO    progress accepted=1200 ...
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

LOGGER = logging.getLogger("histimport")


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event `name` with its fields."""
    LOGGER.log(level, name, extra={"fields": fields})


def timestamp(created: float | None = None) -> str:
    """ISO 8601 in UTC to the millisecond, of `created` (seconds since the epoch) or now:
    2026-12-07T21:14:00.123Z. Every time stamp the tool writes (logs, ledger, failed file)
    is spelt so."""
    return utc_text(datetime.now(UTC) if created is None else datetime.fromtimestamp(created, UTC))


def utc_text(moment: datetime) -> str:
    """A time in UTC as the tool and the API spell it: `YYYY-MM-DDTHH:MM:SS.sssZ`."""
    return f"{moment.isoformat(timespec='milliseconds')[:-6]}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per event: time, level, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        return orjson.dumps(document, default=str).decode()


class TextFormatter(logging.Formatter):
    """time LEVEL event key=value ..., values quoted when they hold a space."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        pairs = " ".join(f"{key}={_text(value)}" for key, value in fields.items())
        head = f"{timestamp(record.created)} {record.levelname:<7} {record.getMessage()}"
        return f"{head} {pairs}" if pairs else head


def _text(value: Any) -> str:
    if isinstance(value, str) and value and " " not in value:
        return value
    return orjson.dumps(value, default=str).decode()


_handler: logging.Handler | None = None


def configure(log_format: str, *, level: int = logging.INFO) -> None:
    """Send the `histimport` logger's events to the current stderr in `log_format` (json
    or text), instead of where an earlier command of this process sent them."""
    global _handler
    if _handler is not None:
        LOGGER.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False
