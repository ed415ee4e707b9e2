"""The documentation tells the truth: every command and option is in README.md, and the
bundled copy of the endpoint's contract is the one the project was built against."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

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


def test_the_image_is_pinned_small_and_not_root() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    bases = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert bases and all(re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", b) for b in bases)
    assert re.search(r"^USER 10001$", dockerfile, re.MULTILINE)
    pins = (REPO / "docker" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    pinned = {line.split("==")[0] for line in pins if line and not line.startswith("#")}
    assert all("==" in line for line in pins if line and not line.startswith("#"))
    for dependency in ("typer", "httpx", "pydantic", "rich", "orjson", "uvicorn"):
        assert dependency in pinned
        installed = importlib.metadata.version(dependency)
        assert f"{dependency}=={installed}" in pins, "docker/requirements.txt is out of date"


def test_the_examples_run_the_image_and_resume_from_the_cache() -> None:
    job = yaml.safe_load((REPO / "docs" / "kubernetes-job.yaml").read_text(encoding="utf-8"))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "histimport" in container["image"] and "command" not in container
    assert container["args"][0] == "load"
    workflow = yaml.safe_load(
        (REPO / "docs" / "github-actions-matrix.yml").read_text(encoding="utf-8")
    )
    uses = [step.get("uses", "") for step in workflow["jobs"]["import"]["steps"]]
    assert uses.index("actions/cache/restore@v4") < uses.index("actions/cache/save@v4")
