"""The command line: one test per exit code, and the key lines of output."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from histimport.cli import app
from histimport.sandbox import RunningSandbox, SandboxConfig, sandbox

from .conftest import REPO
from .factory import interleaved, message, write_jsonl

runner = CliRunner()
CREDENTIALS = {"HISTIMPORT_USERNAME": "importer", "HISTIMPORT_PASSWORD": "right-password"}


def invoke(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env, input=stdin)
    return result.exit_code, result.output


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[RunningSandbox]:
    """A sandbox that wants one user and password."""
    config = SandboxConfig(port=0, username="importer", password="right-password")
    with sandbox(config) as running:
        yield running


def test_version() -> None:
    code, output = invoke("--version")
    assert code == 0 and output.startswith("histimport 0.")


def test_exit_0_when_everything_was_accepted(workdir: Path, server: RunningSandbox) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", n) for n in range(5)])
    code, output = invoke("load", "e.jsonl", "--base-url", server.base_url, env=CREDENTIALS)
    assert code == 0, output
    assert "accepted 5" in output
    assert orjson.loads((workdir / "failed.json").read_bytes())["failures"] == []


def test_exit_1_lists_bad_rows_with_their_lines(workdir: Path) -> None:
    rows = [orjson.dumps(message("d", "c", n)).decode() for n in range(3)]
    rows.insert(
        1, '{"departmentUUID": "d", "customerUUID": "c", "sourceUuid": "x", "sentOn": "yesterday"}'
    )
    (workdir / "e.jsonl").write_text("\n".join(rows) + "\n")
    code, output = invoke("load", "e.jsonl", "--sandbox")
    assert code == 1, output
    assert 'e.jsonl:2: rejected: sentOn: "yesterday" is not a timestamp' in output
    assert "accepted 3" in output and "rejected 1" in output
    (entry,) = orjson.loads((workdir / "failed.json").read_bytes())["failures"]
    assert (entry["line"], entry["stage"], entry["sourceUuid"]) == (2, "rejected", "x")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["load", "missing.jsonl", "--sandbox"], "missing.jsonl: no such file"),
        (["load", "e.jsonl"], "no --base-url given"),
        (["load", "e.txt", "--sandbox"], "cannot tell the format"),
        (["load", "-", "--sandbox"], "reading stdin needs --format"),
        (["load", "e.jsonl", "--base-url", "http://api.example.com/communications"], "unencrypted"),
        (["load", "e.jsonl", "--base-url", "ftp://x/y"], "is not an http(s) URL"),
        (["load", "e.jsonl", "--base-url", "https://platform.test:99999/c"], "out of range"),
        (["load", "e.jsonl", "--base-url", "https://platform.test:abc/c"], "integer"),
        (["load", "e.jsonl", "--base-url", "https://api..example.com/c"], "is not a host name"),
        (["load", "e.jsonl", "--base-url", "https://\u2603.example.com/c"], "is not a host name"),
        (["load", "e.jsonl", "--base-url", "https://platform.test/c\x7f"], "control character"),
        (["load", "e.jsonl", "--sandbox", "--chunk-size", "0"], "--chunk-size must be at least 1"),
        (["load", "e.jsonl", "--sandbox", "--chunk-size", "many"], "chunk-size"),
        (["retry", "e.jsonl", "--sandbox"], "is not a failed file"),
        (["load", "e.jsonl", "--sandbox", "--failed-out", "."], "is a directory"),
        (["load", "e.jsonl", "--sandbox", "--report", "e.jsonl/r.json"], "is not a directory"),
        (["load", "e.jsonl", "--sandbox", "--failed-out", "e.jsonl"], "is the source e.jsonl"),
        (
            ["validate", "e.jsonl", "--report", "out.json", "--failed-out", "out.json"],
            "is also the --failed-out",
        ),
        (["validate", "e.jsonl", "-", "--format", "csv"], "--format csv applies to every source"),
        (["load", "e.jsonl", "--base-url", "https://api.example.com/c"], "no credentials"),
    ],
)
def test_exit_2_for_usage_errors_before_anything_is_sent(
    workdir: Path, args: list[str], says: str
) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    (workdir / "e.txt").write_text("x")
    env = {"HISTIMPORT_USERNAME": "u", "HISTIMPORT_PASSWORD": "p"}
    if args[-1].startswith("https://api.example.com"):
        env = {}
    if (
        "missing" not in args[1]
        and args[0] == "load"
        and "--base-url" not in args
        and "--sandbox" not in args
    ):
        env = {**env}
    code, output = invoke(*args, env=env)
    assert code == 2, output
    assert says in output
    assert "Traceback" not in output


def test_a_clean_validation_names_no_failed_file(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", n) for n in range(3)])
    code, output = invoke("validate", "e.jsonl")
    assert code == 0 and "valid 3" in output, output
    assert "failed file" not in output
    (workdir / "bad.jsonl").write_text("{\n")
    code, output = invoke("validate", "e.jsonl", "bad.jsonl")
    assert code == 1 and "failed file" not in output, output  # none was asked for
    code, output = invoke("validate", "e.jsonl", "bad.jsonl", "--failed-out", "failed.json")
    assert code == 1 and "failed file: failed.json" in output, output


def test_an_output_is_a_regular_file_and_a_symlink_names_it(workdir: Path) -> None:
    """Written beside and renamed over: a pipe or a device would be replaced by a file, so
    neither is taken; through a symlink, the file it names is replaced and the link kept."""
    source = write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    os.mkfifo(workdir / "report.fifo")
    for args, says in (
        (["--report", "report.fifo"], "is not a regular file"),
        (["--report", "/dev/full"], "names a device or a file descriptor"),
        (["--failed-out", "/dev/stdout"], "names a device or a file descriptor"),
    ):
        code, output = invoke("load", "e.jsonl", "--sandbox", *args)
        assert code == 2 and says in output, output
    assert stat.S_ISFIFO((workdir / "report.fifo").lstat().st_mode)
    (workdir / "kept").mkdir()
    (workdir / "link.json").symlink_to("kept/target.json")
    code, output = invoke("load", "e.jsonl", "--sandbox", "--failed-out", "link.json")
    assert code == 0, output
    assert (workdir / "link.json").is_symlink()
    assert orjson.loads((workdir / "kept" / "target.json").read_bytes())["failures"] == []
    # The source read from stdin is a file too: it is not written over.
    with source.open("rb") as stdin:
        redirected = subprocess.run(
            [
                sys.executable,
                "-m",
                "histimport",
                "validate",
                "-",
                "--format=jsonl",
                "--failed-out=e.jsonl",
            ],
            stdin=stdin,
            capture_output=True,
            text=True,
            cwd=workdir,
            timeout=60,
        )
    assert redirected.returncode == 2, redirected.stderr
    assert "is the source -" in redirected.stderr
    assert orjson.loads(source.read_bytes().splitlines()[0])["sourceUuid"]


def test_exit_3_when_the_password_is_refused(workdir: Path, guarded: RunningSandbox) -> None:
    write_jsonl(workdir / "e.jsonl", list(interleaved(customers=30, per_customer=3)))
    env = {"HISTIMPORT_USERNAME": "importer", "HISTIMPORT_PASSWORD": "wrong-password"}
    code, output = invoke(
        "load", "e.jsonl", "--base-url", guarded.base_url, "--concurrency", "4", env=env
    )
    assert code == 3, output
    assert "credentials were refused" in output
    # Told by the first request, sent alone before anything else was read.
    assert guarded.app.stats()["requests"] == 1
    failed = orjson.loads((workdir / "failed.json").read_bytes())
    (entry,) = failed["failures"]
    assert (entry["stage"], entry["line"], entry["errors"][0]["errorCode"]) == (
        "notSent",
        1,
        "NOT_READ",
    )
    assert "wrong-password" not in (workdir / "failed.json").read_text()
    # With the right password, the same command imports everything.
    code, output = invoke("load", "e.jsonl", "--base-url", guarded.base_url, env=CREDENTIALS)
    assert code == 0 and "accepted 90" in output, output


def test_exit_1_when_the_platform_fails_for_longer_than_give_up_after(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", list(interleaved(customers=20, per_customer=3)))
    failing = SandboxConfig(port=0, error_after_store_rate=1.0)  # a 500 to every request
    with sandbox(failing) as running:
        code, output = invoke(
            "load",
            "e.jsonl",
            "--base-url",
            running.base_url,
            "--give-up-after",
            "0.5",
            "--max-attempts",
            "1000",
            env=CREDENTIALS,
        )
    assert code == 1, output
    assert "the platform was failing since" in output and "HTTP 500" in output
    failed = orjson.loads((workdir / "failed.json").read_bytes())
    assert failed["counts"]["notSent"] == 60 and len(failed["failures"]) == 60
    assert all(entry["retryable"] for entry in failed["failures"])


def test_pauses_are_logged_with_their_cause_and_counted_in_the_report(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", list(interleaved(customers=60, per_customer=2)))
    limited = SandboxConfig(port=0, rate_limit=50, rate_burst=5)
    with sandbox(limited) as running:
        code, output = invoke(
            "load",
            "e.jsonl",
            "--base-url",
            running.base_url,
            "--chunk-size",
            "1",
            "--log-format",
            "json",
            "--report",
            "report.json",
            env=CREDENTIALS,
        )
    assert code == 0, output
    events = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    pauses = [e for e in events if e["event"] == "pause"]
    assert pauses and all(e["cause"].startswith("429 Retry-After: ") for e in pauses)
    assert all(e["rate"] is not None and e["rate"] > 0 for e in pauses)
    pacing = orjson.loads((workdir / "report.json").read_bytes())["pacing"]
    assert sum(pacing["pushBacks"].values()) == len(pauses)
    assert pacing["rate"] is not None and pacing["limitEstimate"] is not None
    assert pacing["pausedSeconds"] == pytest.approx(sum(e["waitSeconds"] for e in pauses), abs=0.01)


def test_password_from_stdin(workdir: Path, guarded: RunningSandbox) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    code, output = invoke(
        "load",
        "e.jsonl",
        "--base-url",
        guarded.base_url,
        "--password-stdin",
        env={"HISTIMPORT_USERNAME": "importer"},
        stdin="right-password\n",
    )
    assert code == 0, output


def test_exit_130_on_sigint_then_the_same_command_finishes(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "e.jsonl", list(interleaved(customers=40, per_customer=10)))
    command = [
        sys.executable,
        "-m",
        "histimport",
        "load",
        str(source),
        "--concurrency",
        "2",
        "--chunk-size",
        "5",
        "--state-dir",
        str(tmp_path / "state"),
        "--failed-out",
        str(tmp_path / "failed.json"),
    ]
    with sandbox(SandboxConfig(port=0, latency_ms=40)) as server:
        env = {**os.environ, **CREDENTIALS, "HISTIMPORT_BASE_URL": server.base_url}
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while server.store.count() < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == 130, stderr
        assert "interrupted" in stderr
        failed = orjson.loads((tmp_path / "failed.json").read_bytes())
        assert failed["counts"]["notSent"] > 0
        assert {f["stage"] for f in failed["failures"]} == {"notSent"}
        assert failed["counts"]["notSent"] + server.store.count() == 400

        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert finished.returncode == 0, finished.stderr
        assert server.store.count() == 400
        assert server.store.duplicate_receipts() == 0


def test_a_second_sigint_abandons_the_requests_in_flight_and_still_writes_the_outputs(
    tmp_path: Path,
) -> None:
    """The first Ctrl-C waits for the answers in flight (here, 5 s away); the second stops
    waiting: none of them is taken as accepted, and the failed file and the report are this
    run's, not what an earlier run left."""
    rows = list(interleaved(customers=10, per_customer=3))
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    (tmp_path / "failed.json").write_text("stale")
    command = [
        *(sys.executable, "-m", "histimport", "load", str(source), "--concurrency", "2"),
        *("--state-dir", str(tmp_path / "state"), "--failed-out", str(tmp_path / "failed.json")),
        *("--report", str(tmp_path / "report.json")),
    ]
    with sandbox(SandboxConfig(port=0, latency_ms=5000)) as server:
        env = {**os.environ, **CREDENTIALS, "HISTIMPORT_BASE_URL": server.base_url}
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while server.app.stats()["requests"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted twice" in stderr and "Traceback" not in stderr
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    # The first message went alone, before the others were read; none of the others.
    assert (report["accepted"], report["notSent"]) == (1, len(rows) - 1)
    failed = orjson.loads((tmp_path / "failed.json").read_bytes())
    assert failed["counts"]["notSent"] == len(rows) - 1


def test_retry_reads_stdin_again_in_the_format_the_failed_file_records(workdir: Path) -> None:
    bad = '{"departmentUUID": "d", "customerUUID": "c", "sourceUuid": "s1", "sentOn": "yesterday"}'
    fixed = bad.replace('"yesterday"', '"2024-01-01T00:00:00Z"')
    good = orjson.dumps(message("d", "c", 2)).decode()
    code, output = invoke("load", "-", "--format", "jsonl", "--sandbox", stdin=f"{bad}\n{good}\n")
    assert code == 1, output
    code, output = invoke("retry", "failed.json", "--sandbox", stdin=f"{fixed}\n{good}\n")
    assert code == 0, output
    assert "read 1," in output and "accepted 1," in output


def test_settings_come_from_histimport_toml_and_the_command_line_wins(
    workdir: Path, server: RunningSandbox
) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", n) for n in range(4)])
    (workdir / "histimport.toml").write_text(
        f'base-url = "{server.base_url}"\nreport = "r.json"\n[load]\nchunk-size = 1\n'
    )
    code, output = invoke("load", "e.jsonl", env=CREDENTIALS)
    assert code == 0, output
    assert orjson.loads((workdir / "r.json").read_bytes())["requests"] == 4
    code, output = invoke(
        "load", "e.jsonl", "--chunk-size", "3", "--fresh", "--state-dir", "s2", env=CREDENTIALS
    )
    assert code == 0, output
    assert orjson.loads((workdir / "r.json").read_bytes())["requests"] == 2
    (workdir / "histimport.toml").write_text('password = "no"\n')
    code, output = invoke("load", "e.jsonl", env=CREDENTIALS)
    assert code == 2 and "holds a password" in output


def test_settings_are_named_as_the_options_are(workdir: Path) -> None:
    for name in ("legacy-helpdesk.csv", "legacy-helpdesk.map.toml"):
        (workdir / name).write_bytes((REPO / "samples" / name).read_bytes())
    (workdir / "histimport.toml").write_text(
        'map = "legacy-helpdesk.map.toml"\nno-notify = true\n[load]\nchunk_size = 5\n'
    )
    code, output = invoke("validate", "legacy-helpdesk.csv", "--output", "json")
    assert code == 0, output
    # Commands that take no settings are not held up by them, nor by a typo in them.
    (workdir / "histimport.toml").write_text("chunk-sise = 3\n[sandbox]\nport = 1\n")
    code, output = invoke("status")
    assert "histimport.toml" not in output, output


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ("chunk-sise = 10\n", "chunk-sise: is not an option of any command"),
        ("[validate]\nfresh = true\n", "[validate] fresh: is not an option of validate"),
        ("[lode]\nchunk-size = 2\n", "[lode] is not a command that takes settings"),
        ('sources = ["x.jsonl"]\n', "sources: is not an option of any command"),
    ],
)
def test_a_setting_that_is_no_option_is_a_usage_error(
    workdir: Path, settings: str, says: str
) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    (workdir / "histimport.toml").write_text(settings)
    code, output = invoke("validate", "e.jsonl")
    assert code == 2 and says in output, output


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ('no-notify = "yes"\n', "histimport.toml: no-notify: must be true or false, not 'yes'"),
        ('[validate]\nchunk-size = "100"\n', "[validate] chunk-size: must be an integer"),
        ("[validate]\nstrict = 1\n", "[validate] strict: must be true or false, not 1"),
        ("report = 3\n", "report: must be a string, not 3"),
        ("[validate]\nmax-line-bytes = 2048.5\n", "max-line-bytes: must be an integer, not 2048.5"),
    ],
)
def test_a_setting_of_the_wrong_type_is_a_usage_error(
    workdir: Path, settings: str, says: str
) -> None:
    """TOML values are typed: a quoted number, or a yes for a flag, is a mistake to point at
    (`no-notify = "yes"` read as a string would turn notifications on)."""
    write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    (workdir / "histimport.toml").write_text(settings)
    code, output = invoke("validate", "e.jsonl")
    assert code == 2 and says in output, output


def test_numbers_and_flags_in_settings_are_taken_as_typed(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    (workdir / "histimport.toml").write_text(
        "timeout = 5\nrate = 2\n[validate]\nmax-line-bytes = 2048\nquiet = true\n"
    )
    code, output = invoke("validate", "e.jsonl")
    assert code == 0 and output == "", output


@pytest.mark.parametrize(
    ("url", "same"),
    [
        ("HTTP://LOCALHOST:{port}/communications/", True),
        ("http://localhost:{port}/communications", True),
        ("http://127.0.0.1:{port}/communications", False),
    ],
)
def test_one_target_however_its_url_is_spelt(
    workdir: Path, server: RunningSandbox, url: str, same: bool
) -> None:
    from histimport.target import check_base_url

    port = server.port
    first = check_base_url(f"http://localhost:{port}/communications", allow_insecure_http=False)
    assert (check_base_url(url.format(port=port), allow_insecure_http=False) == first) is same
    assert check_base_url("https://API.example.com:443/c/", allow_insecure_http=False) == (
        "https://api.example.com/c"
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://admin:S3cretPw@api.example.com/c",
        "https://admin:S3cretPw@api.example.com:99999/c",
        "https://admin:S3cretPw@api..example.com/c",
        "https://admin:S3cretPw@\u2603.example.com/c",
        "htps://admin:S3cretPw@api.example.com/c",
        "https://admin:S3cretPw@/c",
        "https://admin:S3cretPw@[::1/c",
    ],
)
def test_a_password_in_the_base_url_is_refused_and_never_echoed(workdir: Path, url: str) -> None:
    """Whatever else is wrong with the URL: that error would quote it whole."""
    write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    code, output = invoke("load", "e.jsonl", "--base-url", url, env=CREDENTIALS)
    assert code == 2, output
    assert "S3cretPw" not in output


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(sources=["a.jsonl"]),
        lambda d: d.update(sources={"path": "a"}),
        lambda d: d["sources"][0].update(path=5),
        lambda d: d.update(failures=["x"]),
        lambda d: d["failures"][0].update(sourceUuid=["s1"]),
        lambda d: d["failures"][0].update(line=[2]),
        lambda d: d.update(format="something/v9"),
    ],
)
def test_a_hand_edited_failed_file_is_a_usage_error(workdir: Path, edit: Any) -> None:
    (workdir / "e.jsonl").write_text(
        '{"departmentUUID": "d", "customerUUID": "c/x", "sourceUuid": "s1"}\n'
    )
    assert invoke("validate", "e.jsonl", "--failed-out", "failed.json")[0] == 1
    document = orjson.loads((workdir / "failed.json").read_bytes())
    edit(document)
    (workdir / "failed.json").write_bytes(orjson.dumps(document))
    code, output = invoke("retry", "failed.json", "--sandbox")
    assert code == 2 and "is not a failed file" in output, output


def test_retry_keeps_listing_what_it_does_not_send(workdir: Path) -> None:
    rows = [message("d", f"c{n}", n) for n in range(40)]
    write_jsonl(workdir / "e.jsonl", rows)
    with sandbox(SandboxConfig(port=0, reject_rate=0.2, fail_rate=0.3, seed=3)) as faulty:
        env = {**CREDENTIALS, "HISTIMPORT_BASE_URL": faulty.base_url}
        code, _ = invoke("load", "e.jsonl", "--chunk-size", "1", "--max-attempts", "1", env=env)
        assert code == 1
        before = orjson.loads((workdir / "failed.json").read_bytes())
        refused = {f["sourceUuid"] for f in before["failures"] if not f["retryable"]}
        assert refused
        code, _ = invoke("retry", "failed.json", "--max-attempts", "20", env=env)
        after = orjson.loads((workdir / "failed.json").read_bytes())
        stored = {m.source_uuid for m in faulty.store.messages()}
    listed = {f["sourceUuid"] for f in after["failures"]}
    assert refused <= listed
    assert listed | stored == {r["sourceUuid"] for r in rows}
    assert after["counts"]["failed"] == len(
        [f for f in after["failures"] if f["stage"] == "failed"]
    )


def test_retry_does_not_choke_on_odd_ids_in_the_source(workdir: Path) -> None:
    (workdir / "e.jsonl").write_text(
        '{"departmentUUID": "d", "customerUUID": "c", "sourceUuid": "s1", "sentOn": "bad"}\n'
        '{"departmentUUID": "d", "customerUUID": "c", "sourceUuid": {"id": "s2"}}\n'
    )
    assert invoke("load", "e.jsonl", "--sandbox")[0] == 1
    code, output = invoke("retry", "failed.json", "--sandbox")
    assert code == 1 and "Traceback" not in output


def test_the_command_leaves_with_its_status_and_all_of_its_output(tmp_path: Path) -> None:
    """The command skips the interpreter's teardown at exit: what it printed still arrives
    whole through a pipe, and its exit status is the command's."""
    rows: list[Any] = [message("d", f"c{n % 9}", n) for n in range(3000)]
    for n in range(0, 3000, 7):
        rows[n]["sentOn"] = "not a time"
    write_jsonl(tmp_path / "e.jsonl", rows)
    run = subprocess.run(
        [sys.executable, "-m", "histimport", "validate", "e.jsonl", "--output", "json"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    document = orjson.loads(run.stdout)  # whole: it parses
    assert document["counts"]["rejected"] == len(range(0, 3000, 7))
    usage = subprocess.run(
        [sys.executable, "-m", "histimport", "load", "missing.jsonl"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert usage.returncode == 2 and "missing.jsonl" in usage.stderr


def test_a_profiler_still_writes_its_results(tmp_path: Path) -> None:
    """The command leaves without the interpreter's teardown, but not under a profiler or
    tracer, which writes its results then (cProfile -o, coverage)."""
    import pstats

    write_jsonl(tmp_path / "e.jsonl", [message("d", "c", n) for n in range(3)])
    argv = [sys.executable, "-m", "cProfile", "-o", "out.prof", "-m", "histimport"]
    run = subprocess.run(
        [*argv, "validate", "e.jsonl"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    stats = pstats.Stats(str(tmp_path / "out.prof"))
    assert any(name == "validate" for _, _, name in stats.stats)


def test_an_output_that_cannot_be_written_at_the_end_says_so(
    tmp_path: Path, server: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the very end: exit 3 with what to do, not a traceback; the ledger has
    the outcomes, and the same command writes the file without sending anything again."""
    import histimport
    from histimport import ExitStatus, accounting, outputs
    from histimport.errors import OutputError

    from .conftest import config_for

    write_jsonl(tmp_path / "e.jsonl", [message("d", "c", n) for n in range(3)])
    config = config_for(server, tmp_path)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accounting, "write_failed", full)
    with pytest.raises(OutputError, match="No space left on device") as raised:
        histimport.load([tmp_path / "e.jsonl"], config)
    assert raised.value.exit_status is ExitStatus.ABORTED
    monkeypatch.setattr(accounting, "write_failed", outputs.write_failed)
    again = histimport.load([tmp_path / "e.jsonl"], config)
    assert again.counts["alreadyAccepted"] == 3 and again.report["requests"] == 0
    assert (tmp_path / "failed.json").exists()


def test_validate_after_load_leaves_the_failed_file_byte_for_byte(workdir: Path) -> None:
    rows = [orjson.dumps(message("d", "c", n)).decode() for n in range(3)]
    rows.append('{"departmentUUID": "d", "customerUUID": "c", "sourceUuid": "bad", "sentOn": "x"}')
    (workdir / "e.jsonl").write_text("\n".join(rows) + "\n")
    code, output = invoke("load", "e.jsonl", "--sandbox")
    assert code == 1, output
    written = (workdir / "failed.json").read_bytes()
    for args in ([], ["--output", "json"], ["--output", "github"]):
        code, output = invoke("validate", "e.jsonl", *args)
        assert code == 1, output
        assert (workdir / "failed.json").read_bytes() == written
    assert "failed file" not in invoke("validate", "e.jsonl")[1]
    # Asked for, it writes one.
    code, output = invoke("validate", "e.jsonl", "--failed-out", "checked.json")
    assert "failed file: checked.json" in output
    (entry,) = orjson.loads((workdir / "checked.json").read_bytes())["failures"]
    assert entry["sourceUuid"] == "bad" and entry["stage"] == "rejected"


def test_validate_takes_no_failed_file_name_from_the_environment(workdir: Path) -> None:
    """HISTIMPORT_FAILED_OUT names every command's failed file: a load's, kept."""
    rows = [orjson.dumps(message("d", "c", n)).decode() for n in range(2)]
    rows.append('{"departmentUUID": "d", "customerUUID": "c", "sourceUuid": "bad", "sentOn": "x"}')
    (workdir / "e.jsonl").write_text("\n".join(rows) + "\n")
    env = {"HISTIMPORT_FAILED_OUT": "mine.json"}
    assert invoke("load", "e.jsonl", "--sandbox", env=env)[0] == 1
    written = (workdir / "mine.json").read_bytes()
    assert invoke("validate", "e.jsonl", env=env)[0] == 1
    assert (workdir / "mine.json").read_bytes() == written


def test_a_closed_port_is_told_by_the_first_request_before_the_export_is_read(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histimport import deliver

    monkeypatch.setattr(deliver, "FIRST_CONTACT_SECONDS", 0.2)
    write_jsonl(workdir / "e.jsonl", list(interleaved(customers=30, per_customer=3)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once it is closed
    url = f"http://127.0.0.1:{port}/communications"
    code, output = invoke("load", "e.jsonl", "--base-url", url, env=CREDENTIALS)
    assert code == 1, output
    assert f"could not be reached at {url}" in output and "--base-url" in output
    assert "read 0" in output
    (entry,) = orjson.loads((workdir / "failed.json").read_bytes())["failures"]
    assert (entry["line"], entry["errors"][0]["errorCode"]) == (1, "NOT_READ")


def test_the_first_message_refused_alone_is_listed_and_the_run_goes_on(workdir: Path) -> None:
    """A department the platform does not know: its message fails, the others go."""
    rows = [message("gone", "c", 0)] + [message("d", "c", n) for n in range(1, 4)]
    write_jsonl(workdir / "e.jsonl", rows)
    with sandbox(SandboxConfig(port=0, departments=frozenset({"d"}))) as running:
        code, output = invoke("load", "e.jsonl", "--base-url", running.base_url, env=CREDENTIALS)
        requests = running.app.stats()["requests"]
    assert code == 1, output
    assert "accepted 3" in output and "failed 1" in output
    assert requests == 2  # the first message alone, then the customer "d"
    (entry,) = orjson.loads((workdir / "failed.json").read_bytes())["failures"]
    assert (entry["line"], entry["stage"], entry["httpStatus"]) == (1, "failed", 404)


def test_the_first_message_sent_alone_is_never_one_rejected_as_a_repeat(workdir: Path) -> None:
    """An earlier, invalid row has its sourceUuid: that valid row is rejected as a repeat,
    so the first request carries the next one."""
    bad = '{"departmentUUID": "d", "customerUUID": "c", "sourceUuid": "s1", "sentOn": "x"}'
    rows = [
        bad,
        orjson.dumps({**message("d", "c", 2), "sourceUuid": "s1"}).decode(),
        orjson.dumps(message("d", "c", 3)).decode(),
    ]
    (workdir / "e.jsonl").write_text("\n".join(rows) + "\n")
    with sandbox(SandboxConfig(port=0)) as running:
        code, output = invoke("load", "e.jsonl", "--base-url", running.base_url, env=CREDENTIALS)
        stored = [m.source_uuid for m in running.store.messages()]
    assert code == 1 and "rejected 2" in output and "accepted 1" in output, output
    assert stored == [message("d", "c", 3)["sourceUuid"]]


def test_the_first_message_refused_alone_is_not_sent_again_by_a_fresh_run(
    workdir: Path,
) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", n) for n in range(3)])
    with sandbox(SandboxConfig(port=0, reject_rate=1.0)) as running:
        code, output = invoke(
            "load", "e.jsonl", "--base-url", running.base_url, "--fresh", env=CREDENTIALS
        )
        receipts = running.store.receipt_count()
    assert code == 1 and "failed 3" in output, output
    assert receipts == 3  # each once: the first alone, then the two others


def test_help_works_whatever_the_settings_say_and_every_command_refuses_a_typo(
    workdir: Path,
) -> None:
    (workdir / "histimport.toml").write_text("[load]\nconcurency = 4\n")
    code, output = invoke("load", "--help")
    assert code == 0 and "<jsonl|csv>" in output and "Examples:" in output
    for command in ("load", "validate", "retry"):
        code, output = invoke(command, "x.jsonl")
        assert code == 2 and "[load] concurency: is not an option of load" in output, command
    code, _ = invoke("status", "--help")
    assert code == 0


def test_config_names_the_settings_file(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", n) for n in range(3)])
    (workdir / "ci.toml").write_text("chunk-size = 1\n")
    code, output = invoke("--config", "ci.toml", "validate", "e.jsonl", "--output", "json")
    assert code == 0, output
    assert orjson.loads(output)["plan"]["requests"] == 3
    code, output = invoke("--config", "missing.toml", "validate", "e.jsonl")
    assert code == 2 and "--config missing.toml: no such file" in output


def test_on_windows_the_command_refuses_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from histimport.cli import main

    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(SystemExit) as done:
        main(["load", "export.jsonl", "--sandbox"])
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: histimport runs on Linux and macOS, not on Windows: use WSL, or the container "
        "image (see README.md, Install)"
    ]
    with pytest.raises(ImportError, match="not on Windows"):
        import histimport

        histimport.load  # noqa: B018 - the attribute's lookup is the import


def test_map_init_proposes_what_imports_the_helpdesk_sample_once_its_values_are_filled_in(
    workdir: Path, server: RunningSandbox
) -> None:
    sample = REPO / "samples" / "legacy-helpdesk.csv"
    code, starter = invoke("map", "init", str(sample))
    assert code == 0, starter
    # ticket_id repeats; ticket_id with msg_no does not. The times are day first.
    assert 'sourceUuid = { template = "{ticket_id}-{msg_no}" }' in starter
    assert 'timestamp = "%d/%m/%Y %H:%M"' in starter
    # What needs the user's knowledge is marked "?": the platform's ids and values.
    knowledge = {
        "Support Nordics": "support-nordics",
        "Sales EMEA": "sales-emea",
        "sms": "SMS",
        "chat": "CHAT",
        "mail": "EMAIL",
        "in": "INBOUND",
        "out": "OUTBOUND",
    }
    filled = re.sub(r'"([^"]+)" = "\?"', lambda m: f'"{m[1]}" = "{knowledge[m[1]]}"', starter)
    assert not re.search(r'^[^#].*" = "\?"', filled, re.MULTILINE)
    (workdir / "starter.toml").write_text(filled)
    code, output = invoke("validate", str(sample), "--map", "starter.toml")
    assert code == 0 and "rejected 0" in output, output
    code, output = invoke(
        "load",
        str(sample),
        "--map",
        "starter.toml",
        "--base-url",
        server.base_url,
        env=CREDENTIALS,
    )
    assert code == 0, output
    assert server.store.count() == 99
    departments = {m.department for m in server.store.messages()}
    assert departments == {"support-nordics", "sales-emea", "Billing"}


def test_map_init_reads_the_values_it_proposes_for() -> None:
    from histimport.mapping import starter_mapping

    rows = [
        {"id": "1", "created": "03/29/2025 10:00", "sent": "2025-03-29T10:00:00Z"},
        {"id": "1", "created": "12/01/2025 09:30", "sent": "2025-12-01T09:30:00+01:00"},
    ]
    starter = starter_mapping(["id", "sent"], "x.csv", rows)
    assert "run with --generate-source-uuid" in starter  # "id" repeats
    assert 'sentOn = { column = "sent", timestamp = "iso" }' in starter
    only_month_first = starter_mapping(["created"], "x.csv", rows[:1])
    assert 'column = "created", timestamp = "%m/%d/%Y %H:%M"' in only_month_first
    ambiguous = starter_mapping(["created"], "x.csv", rows[1:])
    assert 'timestamp = "%d/%m/%Y %H:%M"' in ambiguous and "day or month first?" in ambiguous


def test_map_init_keeps_an_export_s_own_ids_and_tells_ids_apart_by_case() -> None:
    from histimport.mapping import starter_mapping

    rows = [
        {"note_id": str(n), "note": "same", "customer": "AbC1" if n % 2 else "abc 1"}
        for n in range(300)
    ]
    rows[7]["note_id"] = rows[6]["note_id"]  # one repeat in 300: still the export's id
    starter = starter_mapping(["note", "note_id", "customer"], "x.csv", rows)
    assert 'sourceUuid = "note_id"' in starter
    assert 'customerUUID = { column = "customer", strip = true, map = { "abc 1" = "?" } }' in (
        starter
    )
