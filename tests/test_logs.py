"""The logs a person reads after an unattended run: time-stamped, levelled events, progress
while sending, and every pause, retry and give-up as it happens."""

from __future__ import annotations

import io
import logging
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from histimport import logs
from histimport.cli import app
from histimport.display import Display
from histimport.sandbox import SandboxConfig, sandbox

from .factory import interleaved, write_jsonl

CREDENTIALS = {"HISTIMPORT_USERNAME": "importer", "HISTIMPORT_PASSWORD": "pw"}
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) +[a-z-]+")


def json_events(output: str) -> list[dict[str, Any]]:
    """Every line of the output is one event with a time stamp and a level."""
    events = [orjson.loads(line) for line in output.splitlines() if line.strip()]
    for event in events:
        assert datetime.fromisoformat(event["time"]).tzinfo is not None, event
        assert event["level"] in ("info", "warning", "error"), event
    return events


def load_against(config: SandboxConfig, *options: str) -> tuple[int, str, str]:
    """`load e.jsonl` against a sandbox of `config`: exit status, output, base URL."""
    with sandbox(config) as running:
        result = CliRunner().invoke(
            app, ["load", "e.jsonl", "--base-url", running.base_url, *options], env=CREDENTIALS
        )
    return result.exit_code, result.output, running.base_url


def test_a_paced_run_logs_its_start_progress_every_pause_and_its_summary(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", interleaved(customers=12, per_customer=10))
    config = SandboxConfig(port=0, rate_limit=20, rate_burst=2, latency_ms=20)
    code, output, base_url = load_against(
        config,
        "--chunk-size",
        "2",
        "--log-format",
        "json",
        "--progress-interval",
        "0.2",
        "--report",
        "r.json",
    )
    assert code == 0, output
    events = json_events(output)
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-1] == "summary"
    start = events[0]
    assert start["command"] == "load" and start["sources"] == ["e.jsonl"]
    assert start["target"] == base_url and start["chunkSize"] == 2
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, names
    for event in progress:
        for field in ("accepted", "failed", "waiting", "requests", "messagesPerSecond"):
            assert isinstance(event[field], int | float), event
        assert "paceRequestsPerSecond" in event and "etaSeconds" in event
    assert [e["accepted"] for e in progress] == sorted(e["accepted"] for e in progress)
    report = orjson.loads((workdir / "r.json").read_bytes())
    pauses = [e for e in events if e["event"] == "pause"]
    assert sum(report["pacing"]["pushBacks"].values()) == len(pauses) > 0
    assert all(e["level"] == "warning" and e["cause"].startswith("429") for e in pauses)
    assert events[-1]["accepted"] == 120


def test_off_a_terminal_text_logs_are_time_stamped_and_levelled(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", interleaved(customers=3, per_customer=4))
    code, output, _ = load_against(SandboxConfig(port=0))
    assert code == 0, output
    lines = output.splitlines()
    assert lines[-1].startswith("load: read 12,"), lines
    assert all(TEXT_LINE.match(line) for line in lines[:-1]), lines
    assert any(" start command=load " in line for line in lines)


def test_retries_and_give_ups_are_logged_as_they_happen(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", interleaved(customers=2, per_customer=3))
    config = SandboxConfig(port=0, error_after_store_rate=1.0)
    code, output, _ = load_against(
        config, "--max-attempts", "2", "--log-format", "json", "--chunk-size", "3"
    )
    assert code == 1, output
    events = json_events(output)
    retries = [e for e in events if e["event"] == "retry"]
    gave_up = [e for e in events if e["event"] == "gave-up"]
    assert retries and all(e["status"] == 500 and e["attempt"] == 1 for e in retries)
    assert {e["customer"] for e in gave_up} == {"cust-00000", "cust-00001"}
    assert all(e["level"] == "warning" and e["attempts"] == 2 for e in gave_up)
    assert sum(e["messages"] for e in gave_up) == events[-1]["failed"]


def test_quiet_json_logs_errors_only(workdir: Path) -> None:
    result = CliRunner().invoke(
        app, ["load", "missing.jsonl", "--sandbox", "--quiet", "--log-format", "json"]
    )
    assert result.exit_code == 2
    events = json_events(result.output)
    assert [e["event"] for e in events] == ["error"]


def test_progress_events_keep_coming_while_nothing_is_answered() -> None:
    """A long pause (a Retry-After of minutes) still shows in the logs as it goes on."""
    stream = io.StringIO()
    display = Display(quiet=True, log_format="json", progress_interval=0.01)
    display.quiet = False  # logs at info level, but no progress bar
    logs.configure("json")
    handler = logs.LOGGER.handlers[-1]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    seen = threading.Event()
    calls = 0

    def live() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls >= 3:
            seen.set()
        return {"requests": 7, "requestsInFlight": 0, "paceRequestsPerSecond": 0.5}

    display.sending(40)
    display.delivering(live)
    assert seen.wait(30)
    display.done()
    events = json_events(stream.getvalue())
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 3
    assert all(e["requests"] == 7 and e["waiting"] == 40 and e["accepted"] == 0 for e in progress)


@pytest.fixture(autouse=True)
def _own_logger() -> Any:
    """Each test's handler is its own: none is left on the logger for the next test."""
    yield
    for handler in list(logs.LOGGER.handlers):
        logs.LOGGER.removeHandler(handler)
