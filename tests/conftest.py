"""Shared fixtures: zero backoff for every test, a sandbox per test, export factories."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from histimport import Config, policy
from histimport.sandbox import RunningSandbox, SandboxConfig, sandbox

REPO = Path(__file__).resolve().parents[1]
OPENAPI = REPO / "docs" / "openapi.yaml"


def _inline_refs(node: Any, schemas: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(
                schemas[node["$ref"].removeprefix("#/components/schemas/")], schemas
            )
        return {key: _inline_refs(value, schemas) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, schemas) for item in node]
    return node


def contract_schema(name: str) -> dict[str, Any]:
    """A schema of the endpoint's contract (docs/openapi.yaml), with its $refs inlined."""
    schemas = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))["components"]["schemas"]
    return _inline_refs(schemas[name], schemas)  # type: ignore[no-any-return]


def config_for(server: RunningSandbox, tmp_path: Path, **options: Any) -> Config:
    """A run against `server`, with its state, failed file and report under `tmp_path`
    (unless `options` say otherwise)."""
    defaults: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "failed_out": tmp_path / "failed.json",
        "report": tmp_path / "report.json",
    }
    return Config(
        base_url=server.base_url,
        username="importer",
        password="s3cret-pass",
        **{**defaults, **options},
    )


@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    """Retries in tests never sleep (stamina's testing switch, in spirit)."""
    policy.set_testing(True)
    yield
    policy.set_testing(False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningSandbox]:
    with sandbox(SandboxConfig(port=0, db=tmp_path / "sandbox.sqlite3")) as running:
        yield running


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temporary directory, with no credentials in the environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("HISTIMPORT_USERNAME", "HISTIMPORT_PASSWORD", "HISTIMPORT_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
