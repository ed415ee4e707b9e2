"""Servers the tests run for real (nginx, tinyproxy): under CI they must be installed
(`.ci/run` installs them); elsewhere, a test that needs a missing one is skipped."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def required(name: str, *, install: str) -> str:
    """The executable's path; missing, a failure under CI, else a skip."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/usr/bin")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(
            f"{name} is not installed, and CI must run the tests that use it: {install} "
            "(.ci/run does it)",
            pytrace=False,
        )
    pytest.skip(f"{name} is not installed: {install}")


def free_port() -> int:
    """A loopback port nothing listens on (for a server the test starts next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(
    process: subprocess.Popen[bytes], port: int, *, name: str, timeout: float, log: Path
) -> None:
    """Return once `process` accepts connections on `port`; it exited or did not in time:
    an error, with the end of its `log`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
            raise RuntimeError(f"{name} exited with {process.returncode}: {text[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:g}s")
