"""Servers the tests run for real (nginx, tinyproxy): under CI they must be installed
(`.ci/run` installs them); elsewhere, a test that needs a missing one is skipped."""

from __future__ import annotations

import os
import shutil

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
