"""The documentation tells the truth: every command and option is in README.md, and the
bundled copy of the endpoint's contract is the one the project was built against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer

from histimport.cli import app

from .conftest import OPENAPI, REPO

SHARED_OPENAPI = REPO.parent / "shared" / "api" / "openapi.yaml"


def _commands() -> dict[str, Any]:
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_every_command_and_option_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = []
    for name, command in _commands().items():
        if f"histimport {name}" not in readme:
            missing.append(f"command {name}")
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--") and opt != "--help" and opt not in readme:
                    missing.append(f"{name} {opt}")
    assert not missing


def test_there_is_no_password_option() -> None:
    for name, command in _commands().items():
        for param in command.params:
            assert not any(o.lstrip("-") == "password" for o in param.opts), name


@pytest.mark.skipif(not SHARED_OPENAPI.is_file(), reason="no shared contract beside the repo")
def test_bundled_contract_matches_the_shared_one() -> None:
    assert OPENAPI.read_bytes() == SHARED_OPENAPI.read_bytes()


def test_changelog_has_an_unreleased_section() -> None:
    assert "## [Unreleased]" in Path(REPO / "CHANGELOG.md").read_text(encoding="utf-8")
