"""Secrets and trust: no credential in any output or file, transport rules, path safety."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import histimport
from histimport.check import Valid, check_row
from histimport.cli import app
from histimport.read import RawRow
from histimport.sandbox import RunningSandbox, SandboxConfig, sandbox

from .factory import interleaved, message, write_jsonl

runner = CliRunner()
USER = "importer"
PASSWORD = "Pa55-w0rd-that-must-never-leak"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[RunningSandbox]:
    with sandbox(SandboxConfig(port=0, username=USER, password=PASSWORD)) as running:
        yield running


def run_cli(
    args: list[str], env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "histimport", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [s for s in (PASSWORD, BASIC, "Basic ") if s.encode() in data]


@pytest.mark.parametrize("case", ["success", "refused", "password-stdin", "json-logs"])
def test_the_password_appears_in_no_output_and_no_file(
    guarded: RunningSandbox, tmp_path: Path, case: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    source = write_jsonl(work / "e.jsonl", list(interleaved(customers=5, per_customer=30)))
    args = [
        "load",
        str(source),
        "--base-url",
        guarded.base_url,
        "--state-dir",
        str(work / "state"),
        "--failed-out",
        str(work / "failed.json"),
        "--report",
        str(work / "report.json"),
    ]
    env = {"HISTIMPORT_USERNAME": USER, "HISTIMPORT_PASSWORD": PASSWORD}
    stdin = None
    expected = 0
    if case == "refused":
        env["HISTIMPORT_PASSWORD"] = PASSWORD + "-but-wrong"
        expected = 3
    elif case == "password-stdin":
        env = {"HISTIMPORT_USERNAME": USER}
        args.append("--password-stdin")
        stdin = PASSWORD + "\n"
    elif case == "json-logs":
        args += ["--log-format", "json"]
    done = run_cli(args, env, stdin)
    assert done.returncode == expected, done.stderr
    assert not leaks(done.stdout + done.stderr)
    files = [p for p in work.rglob("*") if p.is_file()]
    assert len(files) >= 4  # the source, failed.json, report.json, the ledger
    for path in files:
        assert not leaks(path.read_bytes()), path


def test_plain_http_to_a_remote_host_is_refused_before_connecting(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a connection was attempted")

    from histimport import run  # imported first: it binds the Deliverer it uses

    monkeypatch.setattr(run, "Deliverer", no_network)
    monkeypatch.setattr(httpx.AsyncClient, "__init__", no_network)
    write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    result = runner.invoke(
        app,
        ["load", "e.jsonl", "--base-url", "http://api.example.com/communications"],
        env={"HISTIMPORT_USERNAME": "u", "HISTIMPORT_PASSWORD": "p"},
    )
    assert result.exit_code == 2
    assert "unencrypted" in result.output and "--allow-insecure-http" in result.output


class _Redirector(BaseHTTPRequestHandler):
    target = ""

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(307)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_redirect_to_another_host_is_not_followed(server: RunningSandbox, tmp_path: Path) -> None:
    _Redirector.target = server.root_url
    redirector = ThreadingHTTPServer(("127.0.0.2", 0), _Redirector)
    thread = threading.Thread(target=redirector.serve_forever, daemon=True)
    thread.start()
    try:
        source = write_jsonl(tmp_path / "e.jsonl", [message("d", "c", n) for n in range(3)])
        done = run_cli(
            [
                "load",
                str(source),
                "--base-url",
                f"http://127.0.0.2:{redirector.server_port}/communications",
                "--state-dir",
                str(tmp_path / "s"),
                "--failed-out",
                str(tmp_path / "failed.json"),
            ],
            {"HISTIMPORT_USERNAME": USER, "HISTIMPORT_PASSWORD": PASSWORD},
        )
    finally:
        redirector.shutdown()
        redirector.server_close()
    assert done.returncode == 1, done.stderr
    assert server.app.stats()["requests"] == 0
    failed = (tmp_path / "failed.json").read_text()
    assert "REDIRECT_NOT_FOLLOWED" in failed and server.root_url in failed


def test_tls_is_verified_and_a_ca_bundle_can_be_added(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    source = write_jsonl(tmp_path / "e.jsonl", [message("d", "c", n) for n in range(3)])
    with sandbox(SandboxConfig(port=0, tls_cert=cert, tls_key=key)) as server:
        assert server.base_url.startswith("https://")
        args = [
            "load",
            str(source),
            "--base-url",
            server.base_url,
            "--failed-out",
            str(tmp_path / "f.json"),
        ]
        env = {"HISTIMPORT_USERNAME": "u", "HISTIMPORT_PASSWORD": "p"}
        untrusted = run_cli([*args, "--state-dir", str(tmp_path / "a")], env)
        assert untrusted.returncode == 3, untrusted.stderr
        assert "--ca-bundle" in untrusted.stderr
        assert server.store.count() == 0
        # Another state dir is another import: its failed file is its own.
        args[-1] = str(tmp_path / "f2.json")
        trusted = run_cli(
            [*args, "--state-dir", str(tmp_path / "b"), "--ca-bundle", str(cert)], env
        )
        assert trusted.returncode == 0, trusted.stderr
        assert server.store.count() == 3


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=12), st.text(max_size=12))
def test_no_id_can_lead_anywhere_but_the_endpoint(department: str, customer: str) -> None:
    checked = check_row(RawRow(0, 1, message(department, customer, 1)), notify=False)
    if not isinstance(checked, Valid):
        return
    url = httpx.URL(
        f"https://api.example.com/communications/department/{checked.department}"
        f"/customer/{checked.customer}/communication/historical"
    )
    assert url.host == "api.example.com" and not url.query and not url.fragment
    assert url.path.split("/") == [
        "",
        "communications",
        "department",
        department,
        "customer",
        customer,
        "communication",
        "historical",
    ]


@pytest.mark.parametrize("setting", ["ca bundle", "proxy"])
def test_a_setting_that_would_stop_sending_is_told_before_anything_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """Not after a large export has been read and staged."""
    from histimport import Config
    from histimport.errors import UsageError
    from histimport.run import Silent

    class Watching(Silent):
        def __init__(self) -> None:
            self.read: list[str] = []

        def staging(self, source: str) -> None:
            self.read.append(source)

    source = write_jsonl(tmp_path / "e.jsonl", [message("d", "c", 1)])
    (tmp_path / "bundle.pem").write_text("not a certificate")
    options: dict[str, Any] = {}
    if setting == "ca bundle":
        options["ca_bundle"] = tmp_path / "bundle.pem"
    else:
        monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1")
    watching = Watching()
    config = Config(
        base_url="https://platform.test/c",
        username="u",
        password="p",
        state_dir=tmp_path / "state",
        failed_out=tmp_path / "failed.json",
        **options,
    )
    with pytest.raises(UsageError):
        histimport.load([source], config, observer=watching)
    assert watching.read == []
