"""The run ledger: crash-safe resume, source checks, carried refusals, status, permissions."""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

import histimport
from histimport import ExitStatus
from histimport.cli import app
from histimport.errors import LedgerError
from histimport.ledger import Ledger
from histimport.sandbox import RunningSandbox, SandboxConfig, sandbox

from .conftest import config_for
from .factory import interleaved, message, stopped_after, write_jsonl

runner = CliRunner()
CONCURRENCY = 8
CHUNK = 100


def command(source: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "histimport",
        "load",
        str(source),
        "--state-dir",
        str(tmp_path / "state"),
        "--failed-out",
        str(tmp_path / "failed.json"),
        "--report",
        str(tmp_path / "report.json"),
        "--concurrency",
        str(CONCURRENCY),
        "--chunk-size",
        str(CHUNK),
        *extra,
    ]


def environment(server: RunningSandbox) -> dict[str, str]:
    return {
        **os.environ,
        "HISTIMPORT_USERNAME": "u",
        "HISTIMPORT_PASSWORD": "p",
        "HISTIMPORT_BASE_URL": server.base_url,
    }


def cut_off_gzip(tmp_path: Path) -> tuple[Path, bytes, list[dict[str, Any]]]:
    """A gzipped export of 3,000 messages whose file holds the first half only, as a
    transfer cut short leaves it; with the whole compressed bytes and the rows."""
    rows = [message("d", f"c{n % 7}", n) for n in range(3000)]
    packed = gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    source = tmp_path / "e.jsonl.gz"
    source.write_bytes(packed[: len(packed) // 2])
    return source, packed, rows


def kill_when(server: RunningSandbox, process: subprocess.Popen[bytes], stored: int) -> int:
    """SIGKILL the import once the server holds at least `stored` messages; how many it
    holds once the import is dead (more may have come between the last look and the kill)."""
    deadline = time.monotonic() + 60
    while server.store.count() < stored and process.poll() is None:
        assert time.monotonic() < deadline, "the import made no progress"
        time.sleep(0.005)
    process.kill()
    process.wait()
    return server.store.count()


def test_killed_twice_then_resumed_stores_everything_once(tmp_path: Path) -> None:
    rows = list(interleaved(customers=600, per_customer=100))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, latency_ms=15)) as server:
        env = environment(server)
        for threshold in (15_000, 35_000):
            process = subprocess.Popen(command(source, tmp_path), env=env)
            stored = kill_when(server, process, threshold)
            assert process.returncode == -signal.SIGKILL
        finished = subprocess.run(
            command(source, tmp_path), env=env, capture_output=True, timeout=120
        )
        assert finished.returncode == 0, finished.stderr
        assert server.store.count() == 60_000
        # Only what was in flight at each kill may have been sent twice.
        assert server.store.duplicate_receipts() <= 2 * CONCURRENCY * CHUNK
        report = orjson.loads((tmp_path / "report.json").read_bytes())
        assert report["read"] == 60_000
        assert report["accepted"] + report["alreadyAccepted"] == 60_000
        # The ledger knew all that was stored at the last kill, but what was in flight at
        # either kill (as for the repeats above).
        assert report["alreadyAccepted"] >= stored - 2 * CONCURRENCY * CHUNK
        # Per-customer order survives the kills.
        by_customer: dict[str, list[str]] = {}
        for m in server.store.messages():
            by_customer.setdefault(m.customer, []).append(m.source_uuid)
        assert all(uuids == sorted(uuids) for uuids in by_customer.values())

        requests = server.app.stats()["requests"]
        again = subprocess.run(command(source, tmp_path), env=env, capture_output=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert server.app.stats()["requests"] == requests
        report = orjson.loads((tmp_path / "report.json").read_bytes())
        assert (report["requests"], report["alreadyAccepted"]) == (0, 60_000)


@pytest.mark.parametrize("moment", ["staging", "first answers"])
def test_killed_at_any_moment_leaves_a_usable_ledger(tmp_path: Path, moment: str) -> None:
    rows = list(interleaved(customers=50, per_customer=40))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, latency_ms=20)) as server:
        env = environment(server)
        process = subprocess.Popen(command(source, tmp_path, "--chunk-size", "10"), env=env)
        if moment == "staging":
            while not (tmp_path / "state" / "ledger.sqlite3").exists():
                time.sleep(0.001)
            process.kill()
            process.wait()
        else:
            kill_when(server, process, 1)
        finished = subprocess.run(
            command(source, tmp_path), env=env, capture_output=True, timeout=60
        )
        assert finished.returncode == 0, finished.stderr
        report = orjson.loads((tmp_path / "report.json").read_bytes())
        assert report["read"] == 2000 == report["accepted"] + report["alreadyAccepted"]
        assert server.store.count() == 2000


def test_a_changed_source_needs_fresh(server: RunningSandbox, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "e.jsonl", [message("d", "c", n) for n in range(5)])
    assert histimport.load([source], config_for(server, tmp_path)).exit_status is ExitStatus.OK
    write_jsonl(source, [message("d", "c", n) for n in range(8)])
    with pytest.raises(histimport.HistimportError, match="changed since the last run") as caught:
        histimport.load([source], config_for(server, tmp_path))
    assert caught.value.exit_status == ExitStatus.USAGE and "--fresh" in (caught.value.hint or "")
    assert server.store.receipt_count() == 5
    fresh = histimport.load([source], config_for(server, tmp_path, fresh=True))
    assert fresh.exit_status is ExitStatus.OK
    assert (fresh.counts["accepted"], fresh.counts["alreadyAccepted"]) == (3, 5)
    assert server.store.receipt_count() == 8


def test_refusals_are_carried_not_resent(tmp_path: Path) -> None:
    rows = [message("d", f"c{n % 4}", n) for n in range(200)]
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    with sandbox(SandboxConfig(port=0, reject_rate=0.1, seed=3)) as server:
        first = histimport.load([source], config_for(server, tmp_path))
        assert first.exit_status is ExitStatus.INCOMPLETE
        refused = first.counts["failed"]
        assert refused > 0 and first.counts["accepted"] == 200 - refused
        receipts = server.store.receipt_count()
        again = histimport.load([source], config_for(server, tmp_path))
        assert again.exit_status is ExitStatus.INCOMPLETE
        assert (again.report["requests"], again.counts["failed"]) == (0, refused)
        failures = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
        assert {f["errors"][0]["errorCode"] for f in failures} == {"REJECTED"}
        assert server.store.receipt_count() == receipts
        retried = histimport.retry(
            [tmp_path / "failed.json"], config_for(server, tmp_path), include_permanent=True
        )
        assert retried.report["requests"] > 0 and retried.counts["read"] == refused


def test_a_lock_file_unlinked_before_it_is_locked_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status --purge` unlinks the lock file while it holds it: a run that opened the old
    file just before could lock it once purge lets go, beside a run on a new one."""
    state = tmp_path / "state"
    state.mkdir()
    flock = fcntl.flock

    def purged_meanwhile(fd: Any, operation: int) -> None:
        (state / "lock").unlink(missing_ok=True)
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", purged_meanwhile)
    with pytest.raises(LedgerError, match="was being deleted as this run began"):
        Ledger(state)
    monkeypatch.setattr(fcntl, "flock", flock)
    with Ledger(state):
        pass  # the same command again


def test_state_is_private(server: RunningSandbox, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "e.jsonl", [message("d", "c", 1)])
    histimport.load([source], config_for(server, tmp_path))
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    with Ledger(state) as ledger:  # open, so that SQLite's -wal and -shm files exist too
        ledger.begin_run("load", "x")
        files = list(state.iterdir())
        assert {f.name for f in files} >= {"ledger.sqlite3", "ledger.sqlite3-wal", "lock"}
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_status_and_purge(server: RunningSandbox, workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", n) for n in range(3)])
    write_jsonl(workdir / "bad.jsonl", [message("d", "c/x", 9)])
    env = {
        "HISTIMPORT_USERNAME": "u",
        "HISTIMPORT_PASSWORD": "p",
        "HISTIMPORT_BASE_URL": server.base_url,
    }
    assert runner.invoke(app, ["load", "e.jsonl"], env=env).exit_code == 0
    assert runner.invoke(app, ["load", "bad.jsonl", "--state-dir", "other"], env=env).exit_code == 1
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0
    assert f"{server.base_url}: 3 accepted" in result.stdout
    assert "run 1 load" in result.stdout and ": finished: everything accepted" in result.stdout
    both = runner.invoke(
        app, ["status", "--state-dir", ".histimport", "--state-dir", "other", "--json"]
    )
    document = orjson.loads(both.stdout)
    assert [s["lastRun"] for s in document["stateDirs"]] == [
        {"accepted": 3, "rejected": 0},
        {"rejected": 1},
    ]
    assert document["stateDirs"][1]["errorCodes"] == {"INVALID_ID": 1}
    refused = runner.invoke(app, ["status", "--state-dir", "other", "--purge"])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert runner.invoke(app, ["status", "--purge"]).exit_code == 0
    assert not (workdir / ".histimport").exists()
    assert (
        runner.invoke(app, ["status", "--state-dir", "other", "--purge", "--force"]).exit_code == 0
    )
    assert runner.invoke(app, ["status"]).exit_code == 2


def test_a_state_dir_in_a_directory_of_ones_own_is_purged_of_its_files_only(
    server: RunningSandbox, workdir: Path
) -> None:
    project = workdir / "project"
    project.mkdir(mode=0o755)
    os.chmod(project, 0o755)
    write_jsonl(project / "e.jsonl", [message("d", "c", n) for n in range(3)])
    (project / "notes.txt").write_text("mine")
    env = {"HISTIMPORT_USERNAME": "u", "HISTIMPORT_PASSWORD": "p"}
    args = ["load", "project/e.jsonl", "--base-url", server.base_url, "--state-dir", "project"]
    assert runner.invoke(app, args, env=env).exit_code == 0
    assert stat.S_IMODE(project.stat().st_mode) == 0o755  # its mode is its owner's
    assert stat.S_IMODE((project / "ledger.sqlite3").stat().st_mode) == 0o600
    purged = runner.invoke(app, ["status", "--state-dir", "project", "--purge"])
    assert purged.exit_code == 0, purged.output
    assert "kept the directory" in purged.output
    assert sorted(p.name for p in project.iterdir()) == ["e.jsonl", "notes.txt"]
    # Through a symlink, the directory it names goes, then the link.
    (workdir / "real").mkdir()
    (workdir / "link").symlink_to("real")
    args = ["load", "project/e.jsonl", "--base-url", server.base_url, "--state-dir", "link"]
    assert runner.invoke(app, args, env=env).exit_code == 0
    purged = runner.invoke(app, ["status", "--state-dir", "link", "--purge"])
    assert purged.exit_code == 0, purged.output
    assert not (workdir / "real").exists() and not (workdir / "link").is_symlink()


def test_sigterm_while_reading_exits_130_and_retry_reads_on_from_there(tmp_path: Path) -> None:
    """Every row read and not accepted is listed, and one entry says where the rows not read
    begin: the retry of the failed file sends them all, once."""
    rows = list(interleaved(customers=500, per_customer=200))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0)) as server:
        process = subprocess.Popen(
            command(source, tmp_path), env=environment(server), stderr=subprocess.PIPE
        )
        # The rows read are recorded, in the staging's log first: about 10,000 in 1 MB.
        log = tmp_path / "state" / "staging.sqlite3-wal"
        while not log.exists() or log.stat().st_size < 1_000_000:
            assert process.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert b"where the rows not read begin" in stderr
        report = orjson.loads((tmp_path / "report.json").read_bytes())
        failed = orjson.loads((tmp_path / "failed.json").read_bytes())
        read = report["read"]
        assert 0 < read < 100_000 and report["failed"] == 0
        assert read == report["accepted"] + report["notSent"]
        *listed, rest = failed["failures"]
        assert len(listed) == report["notSent"] and {f["stage"] for f in listed} == {"notSent"}
        assert (rest["line"], rest["sourceUuid"], rest["stage"], rest["retryable"]) == (
            read + 1,
            None,
            "notSent",
            True,
        )
        assert [e["errorCode"] for e in rest["errors"]] == ["NOT_READ"]

        result = histimport.retry(
            [tmp_path / "failed.json"],
            config_for(server, tmp_path, failed_out=tmp_path / "again.json"),
        )
        assert result.exit_status is ExitStatus.OK, result.message
        assert server.store.count() == len(rows) and server.store.duplicate_receipts() == 0
    assert orjson.loads((tmp_path / "again.json").read_bytes())["failures"] == []


def _limit_file_size() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_a_full_disk_stops_the_run_with_a_clear_error(
    server: RunningSandbox, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "export.jsonl", interleaved(customers=50, per_customer=300))
    process = subprocess.run(
        command(source, tmp_path),
        env={**environment(server), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=120,
    )
    assert process.returncode == 3, process.stderr
    assert "cannot write" in process.stderr and "run the same command again" in process.stderr
    assert "Traceback" not in process.stderr
    # With room again, the same command goes on from what was committed.
    again = subprocess.run(
        command(source, tmp_path), env=environment(server), capture_output=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert server.store.count() == 50 * 300


def test_a_load_stopped_before_its_last_batch_was_staged_lists_each_source_s_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: RunningSandbox
) -> None:
    """Both sources read to their end, but the batch that held their rows never staged:
    each is listed from its first line, and the retry of the failed file sends them all."""
    first = write_jsonl(tmp_path / "a.jsonl", [message("d", "c", n) for n in range(3)])
    second = write_jsonl(tmp_path / "b.jsonl", [message("d", "e", n) for n in range(4)])

    with stopped_after(0):
        result = histimport.load([first, second], config_for(server, tmp_path))
    # The first message went alone, before the rest was read; never staged, it is listed
    # with the rest, and not sent again: the ledger knows it as accepted.
    assert result.exit_status is ExitStatus.INTERRUPTED and server.store.count() == 1
    failed = orjson.loads((tmp_path / "failed.json").read_bytes())
    assert [(f["source"], f["line"], f["errors"][0]["errorCode"]) for f in failed["failures"]] == [
        (str(first), 1, "NOT_READ"),
        (str(second), 1, "NOT_READ"),
    ]
    again = histimport.retry(
        [tmp_path / "failed.json"], config_for(server, tmp_path, failed_out=tmp_path / "r.json")
    )
    assert again.exit_status is ExitStatus.OK and server.store.count() == 7
    assert server.store.duplicate_receipts() == 0


def test_a_retry_interrupted_while_staging_lists_every_entry_it_did_not_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows read but not yet in the ledger when Ctrl-C came are listed again as they were:
    what the new failed file lists comes from what was staged, not from what was read."""

    rows = list(interleaved(customers=10, per_customer=30))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, fail_rate=1.0)) as down:
        histimport.load([source], config_for(down, tmp_path, max_attempts=1))
    listed = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert len(listed) == len(rows)

    with sandbox(SandboxConfig(port=0)) as healed, stopped_after(0):
        result = histimport.retry(
            [tmp_path / "failed.json"],
            replace(config_for(healed, tmp_path), failed_out=tmp_path / "again.json"),
        )
        assert healed.store.count() == 1  # the first entry, alone, to check the platform
    assert result.exit_status is ExitStatus.INTERRUPTED
    assert result.message is not None and "lists again" in result.message
    again = orjson.loads((tmp_path / "again.json").read_bytes())["failures"]
    assert {f["sourceUuid"] for f in again} == {r["sourceUuid"] for r in rows}


def test_retry_of_overlapping_failed_files_lists_each_message_once(tmp_path: Path) -> None:
    rows = list(interleaved(customers=5, per_customer=10))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, reject_rate=1.0)) as refusing:
        for name in ("first.json", "second.json"):
            histimport.load(
                [source],
                replace(config_for(refusing, tmp_path), failed_out=tmp_path / name, fresh=True),
            )
    with sandbox(SandboxConfig(port=0)) as server:
        result = histimport.retry(
            [tmp_path / "first.json", tmp_path / "second.json"],
            replace(config_for(server, tmp_path), failed_out=tmp_path / "again.json"),
        )
    again = orjson.loads((tmp_path / "again.json").read_bytes())
    uuids = [f["sourceUuid"] for f in again["failures"]]
    assert sorted(uuids) == sorted(r["sourceUuid"] for r in rows)  # refused: carried, once
    assert again["counts"]["failed"] == len(rows)
    assert result.exit_status is ExitStatus.INCOMPLETE  # refused for good: still not accepted
    # The file counts its entries; the run's own counts, and its error codes, its own rows.
    assert (result.report["failed"], result.report["errorCodes"]) == (0, {})


def test_retry_reads_a_source_once_however_its_failed_files_spell_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards' runs, one given the path relative to where it ran, the other absolute."""
    rows = list(interleaved(customers=8, per_customer=5))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    with sandbox(SandboxConfig(port=0, fail_rate=1.0)) as down:
        for shard, path in ((0, "./export.jsonl"), (1, str(source))):
            config = config_for(down, tmp_path, max_attempts=1, shard=(shard, 2))
            failed_out = tmp_path / f"shard{shard}.json"
            histimport.load([path], replace(config, failed_out=failed_out))
    spelt = [orjson.loads((tmp_path / f"shard{n}.json").read_bytes()) for n in (0, 1)]
    assert [f["sources"][0]["path"] for f in spelt] == ["./export.jsonl", str(source)]
    assert sum(len(f["failures"]) for f in spelt) == len(rows)
    with sandbox(SandboxConfig(port=0)) as healed:
        result = histimport.retry(
            [tmp_path / "shard0.json", tmp_path / "shard1.json"],
            replace(config_for(healed, tmp_path), failed_out=tmp_path / "again.json"),
        )
        assert healed.store.count() == len(rows) and healed.store.duplicate_receipts() == 0
    assert result.exit_status is ExitStatus.OK, result.message
    assert (result.report["read"], result.report["accepted"]) == (len(rows), len(rows))
    again = orjson.loads((tmp_path / "again.json").read_bytes())
    assert again["failures"] == [] and [s["path"] for s in again["sources"]] == ["./export.jsonl"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_outputs_are_written_waits_for_them(
    tmp_path: Path, server: RunningSandbox, sig: signal.Signals
) -> None:
    """The run's last steps (settling, the failed file, the report) finish first: a Ctrl-C or
    SIGTERM then neither kills the process nor leaves an old failed file in place."""
    write_jsonl(tmp_path / "e.jsonl", [message("d", "c", n) for n in range(5)])
    script = (
        "import os, signal, sys\n"
        "from histimport import accounting\n"
        "write = accounting.write_failed\n"
        "def signalled(*args, **kwargs):\n"
        f"    os.kill(os.getpid(), {int(sig)})\n"
        "    write(*args, **kwargs)\n"
        "accounting.write_failed = signalled\n"
        "from histimport.cli import main\n"
        f"main(['load', 'e.jsonl', '--base-url', {server.base_url!r}, '--report', 'r.json'])\n"
    )
    (tmp_path / "failed.json").write_text("stale")
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "HISTIMPORT_USERNAME": "importer", "HISTIMPORT_PASSWORD": "s3cret-pass"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads((tmp_path / "failed.json").read_bytes())["counts"]["notSent"] == 0
    assert orjson.loads((tmp_path / "r.json").read_bytes())["accepted"] == 5


def test_status_names_a_target_that_only_refused(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", [message("d", "c", n) for n in range(3)])
    with sandbox(SandboxConfig(port=0, departments=frozenset({"elsewhere"}))) as server:
        env = {"HISTIMPORT_USERNAME": "u", "HISTIMPORT_PASSWORD": "p"}
        loaded = runner.invoke(app, ["load", "e.jsonl", "--base-url", server.base_url], env=env)
        assert loaded.exit_code == 1
    result = runner.invoke(app, ["status"])
    assert f"{server.base_url}: 0 accepted, 3 refused" in result.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_status_reads_a_state_dir_it_cannot_write(tmp_path: Path, server: RunningSandbox) -> None:
    """An archived or read-only state dir: SQLite cannot make its shared-memory file there."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    can_run = subprocess.run(
        [*nobody, sys.executable, "-c", "import histimport"], capture_output=True, cwd="/"
    )
    if can_run.returncode != 0:
        pytest.skip("another user cannot run this checkout (a private directory)")
    write_jsonl(tmp_path / "e.jsonl", [message("d", "c", n) for n in range(3)])
    state = Path(tempfile.mkdtemp()) / "state"  # where another user may enter
    os.chmod(state.parent, 0o755)
    histimport.load([tmp_path / "e.jsonl"], replace(config_for(server, tmp_path), state_dir=state))
    subprocess.run(["chown", "-R", "65534:65534", str(state)], check=True)
    subprocess.run(["chmod", "-R", "a-w", str(state)], check=True)
    try:
        done = subprocess.run(
            [*nobody, sys.executable, "-m", "histimport", "status", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
        )
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(state)], check=True)
        shutil.rmtree(state.parent)
    assert done.returncode == 0, done.stderr
    assert "3 accepted" in done.stdout


def test_a_fresh_run_stopped_while_staging_keeps_the_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = list(interleaved(customers=3, per_customer=4))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, reject_rate=1.0)) as refusing:
        config = config_for(refusing, tmp_path)
        assert histimport.load([source], config).counts["failed"] == len(rows)
        with stopped_after(0):
            stopped = histimport.load([source], replace(config, fresh=True))
        assert stopped.exit_status is ExitStatus.INTERRUPTED
        again = histimport.load([source], config)
        assert again.report["requests"] == 0 and again.counts["failed"] == len(rows)


def test_after_sending_the_signal_handlers_are_those_from_before() -> None:
    """asyncio puts back the defaults when its handlers go (SIGTERM's kills the process): the
    run's own handlers must be back for the last settle and the outputs."""
    import asyncio

    from histimport.signals import install_async_signals, sigterm_as_interrupt

    with sigterm_as_interrupt():
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

        async def sending() -> None:
            install_async_signals(lambda: None, lambda: None, lambda: None)()

        asyncio.run(sending())
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_retry_meets_a_listed_message_by_its_source_uuid_not_by_its_old_line(
    tmp_path: Path, server: RunningSandbox
) -> None:
    """Edited since, the source holds another row at the listed line, and the listed one is
    somewhere else, still broken: it stays listed."""
    rows = [message("d", "c", n) for n in range(4)]
    rows[2]["sentOn"] = "yesterday"
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    histimport.load([source], config_for(server, tmp_path))
    listed = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert [(f["line"], f["sourceUuid"]) for f in listed] == [(3, rows[2]["sourceUuid"])]
    fixed = dict(rows[2], sentOn="2024-01-02T00:00:00Z")
    lines = [orjson.dumps(r).decode() for r in (rows[0], rows[1], rows[3])]
    source.write_text("\n".join([*lines, orjson.dumps(fixed).decode()[:-1]]) + "\n")  # a typo
    histimport.retry(
        [tmp_path / "failed.json"],
        config_for(server, tmp_path, failed_out=tmp_path / "again.json"),
    )
    again = orjson.loads((tmp_path / "again.json").read_bytes())["failures"]
    assert rows[2]["sourceUuid"] in {f["sourceUuid"] for f in again}


def test_a_reject_fixed_under_another_source_uuid_is_met_by_its_line(
    tmp_path: Path, server: RunningSandbox
) -> None:
    rows = [message("d", "c", n) for n in range(3)]
    rows[1]["sentOn"] = "yesterday"
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    histimport.load([source], config_for(server, tmp_path))
    fixed = dict(rows[1], sentOn="2024-01-02T00:00:00Z", sourceUuid="d.c.renamed")
    write_jsonl(source, [rows[0], fixed, rows[2]])
    result = histimport.retry(
        [tmp_path / "failed.json"], config_for(server, tmp_path, failed_out=tmp_path / "r.json")
    )
    assert result.exit_status is ExitStatus.OK, result.message
    assert orjson.loads((tmp_path / "r.json").read_bytes())["failures"] == []
    assert "d.c.renamed" in {m.source_uuid for m in server.store.messages()}


def test_a_listed_line_that_now_holds_a_message_accepted_before_is_not_met(
    tmp_path: Path, server: RunningSandbox
) -> None:
    """A line deleted above two listed rejects moves other rows, accepted long ago, to their
    lines: those are not the rows listed, which stay listed (the fixed one would otherwise
    be lost: it is at another line now, and never read)."""
    rows = [message("d", "c", n) for n in range(6)]
    junk = {"departmentUUID": "d", "customerUUID": "c", "note": "junk"}
    no_id = {k: v for k, v in rows[4].items() if k != "sourceUuid"}
    source = write_jsonl(tmp_path / "e.jsonl", [rows[0], junk, rows[2], rows[3], no_id, rows[5]])
    histimport.load([source], config_for(server, tmp_path))
    listed = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert [(f["line"], f["sourceUuid"]) for f in listed] == [(2, None), (5, None)]
    write_jsonl(source, [rows[0], rows[2], rows[3], rows[4], rows[5]])  # junk gone, id added
    result = histimport.retry(
        [tmp_path / "failed.json"], config_for(server, tmp_path, failed_out=tmp_path / "r.json")
    )
    assert result.exit_status is ExitStatus.INCOMPLETE
    again = orjson.loads((tmp_path / "r.json").read_bytes())["failures"]
    assert [(f["line"], f["sourceUuid"]) for f in again] == [(2, None), (5, None)]
    # A load of the edited source (--fresh: it changed) sends the fixed row, and it alone.
    histimport.load(
        [source], config_for(server, tmp_path, failed_out=tmp_path / "l.json", fresh=True)
    )
    assert server.store.count() == 5 and server.store.duplicate_receipts() == 0


def test_a_listed_line_that_now_holds_another_listed_message_is_not_met(
    tmp_path: Path,
) -> None:
    """A row added at the top moves every row down: line 2, listed as a reject, now holds
    the message listed at line 1. The reject stays listed (its fixed row, at line 3 now, is
    wanted by nothing), rather than being taken as done."""
    rows = [message("d", "c", n) for n in range(3)]
    rows[1]["sentOn"] = "yesterday"
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    with sandbox(SandboxConfig(port=0, fail_rate=1.0)) as down:
        histimport.load([source], config_for(down, tmp_path, max_attempts=1))
    fixed = dict(rows[1], sentOn="2024-01-02T00:00:00Z", sourceUuid="d.c.fixed")
    write_jsonl(source, [message("d", "c", 99), rows[0], fixed, rows[2]])
    with sandbox(SandboxConfig(port=0)) as server:
        result = histimport.retry(
            [tmp_path / "failed.json"],
            config_for(server, tmp_path, failed_out=tmp_path / "r.json"),
        )
    assert result.exit_status is ExitStatus.INCOMPLETE
    again = orjson.loads((tmp_path / "r.json").read_bytes())["failures"]
    assert [(f["line"], f["stage"]) for f in again] == [(2, "rejected")]


def test_two_rejects_with_one_source_uuid_are_both_read_again(
    tmp_path: Path, server: RunningSandbox
) -> None:
    """An invalid row, then a valid repeat of its sourceUuid (a duplicate, not sent in its
    place): the invalid one, fixed under another sourceUuid, is sent by the retry."""
    rows = [message("d", "c", n) for n in range(4)]
    rows[1]["sentOn"] = "yesterday"
    rows[3]["sourceUuid"] = rows[1]["sourceUuid"]
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    histimport.load([source], config_for(server, tmp_path))
    listed = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert [(f["line"], f["errors"][0]["errorCode"]) for f in listed] == [
        (2, "INVALID_TIMESTAMP"),
        (4, "DUPLICATE_SOURCE_UUID"),
    ]
    fixed = dict(rows[1], sentOn="2024-01-02T00:00:00Z", sourceUuid="d.c.fixed")
    write_jsonl(source, [rows[0], fixed, rows[2], rows[3]])
    result = histimport.retry(
        [tmp_path / "failed.json"], config_for(server, tmp_path, failed_out=tmp_path / "r.json")
    )
    assert result.exit_status is ExitStatus.OK, result.message
    stored = {m.source_uuid for m in server.store.messages()}
    assert {"d.c.fixed", rows[3]["sourceUuid"]} <= stored and len(stored) == 4


def test_a_shard_stopped_while_reading_is_retried_with_its_own_rows_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: RunningSandbox
) -> None:
    rows = list(interleaved(customers=10, per_customer=10))
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    histimport.load(
        [source], config_for(server, tmp_path, shard=(0, 2), failed_out=tmp_path / "s0.json")
    )
    shard_0 = server.store.count()
    with stopped_after(20):
        config = config_for(server, tmp_path, shard=(1, 2), failed_out=tmp_path / "s1.json")
        histimport.load([source], replace(config, state_dir=tmp_path / "state1"))
    (rest,) = [
        f
        for f in orjson.loads((tmp_path / "s1.json").read_bytes())["failures"]
        if f["sourceUuid"] is None
    ]
    assert (rest["errors"][0]["errorCode"], rest["shard"]) == ("NOT_READ", "1/2")
    # In shard 1's state dir, which knows the message its first request sent alone.
    result = histimport.retry(
        [tmp_path / "s0.json", tmp_path / "s1.json"],
        config_for(server, tmp_path, state_dir=tmp_path / "state1", failed_out=tmp_path / "r.json"),
    )
    assert result.exit_status is ExitStatus.OK, result.message
    assert result.counts["read"] == len(rows) - shard_0  # shard 1's rows, and none of shard 0's
    assert server.store.count() == len(rows) and server.store.duplicate_receipts() == 0


def test_two_shards_stopped_at_the_same_line_are_both_read_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: RunningSandbox
) -> None:
    rows = list(interleaved(customers=10, per_customer=5))
    source = write_jsonl(tmp_path / "e.jsonl", rows)

    with stopped_after(0):
        for k in (0, 1):
            config = config_for(server, tmp_path, shard=(k, 2), failed_out=tmp_path / f"s{k}.json")
            histimport.load([source], config)
    result = histimport.retry(
        [tmp_path / "s0.json", tmp_path / "s1.json"], config_for(server, tmp_path)
    )
    assert result.exit_status is ExitStatus.OK, result.message
    assert server.store.count() == len(rows)


def test_a_row_with_an_empty_id_is_shard_0_s_in_a_retry_as_in_a_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: RunningSandbox
) -> None:
    rows: list[dict[str, Any]] = [message("d", f"k{n}", n) for n in range(8)]
    rows[5]["departmentUUID"] = ""
    source = write_jsonl(tmp_path / "e.jsonl", rows)

    with stopped_after(0):
        histimport.load([source], config_for(server, tmp_path, shard=(0, 2)))
    result = histimport.retry(
        [tmp_path / "failed.json"], config_for(server, tmp_path, failed_out=tmp_path / "r.json")
    )
    again = orjson.loads((tmp_path / "r.json").read_bytes())["failures"]
    assert [(f["line"], f["errors"][0]["errorCode"]) for f in again] == [(6, "INVALID_ID")]
    assert result.exit_status is ExitStatus.INCOMPLETE


def test_a_platform_error_code_that_reads_like_ours_does_not_read_a_source_on() -> None:
    """Only an entry that stands for no message (no sourceUuid) says where reading stopped."""
    from histimport.matching import Selection
    from histimport.outputs import FailedEntry

    selection = Selection()
    error = {"errorCode": "NOT_READ", "errorDescription": "the platform's own words"}
    entry = FailedEntry(
        sourceUuid="u", source="e.jsonl", line=3, stage="failed", retryable=True, errors=[error]
    )
    selection.add(entry)
    assert selection.rest_from == {} and selection.uuids == {"u": entry}


def test_a_row_listed_by_its_line_and_later_by_its_source_uuid_is_met_once(
    tmp_path: Path,
) -> None:
    """A reject without a sourceUuid, given one by the user, then failed under it by a
    retry against a platform that was down: both failed files list one row."""
    rows = [message("d", "c", n) for n in range(4)]
    no_id = {k: v for k, v in rows[2].items() if k != "sourceUuid"}
    source = write_jsonl(tmp_path / "e.jsonl", [rows[0], rows[1], no_id, rows[3]])
    with sandbox(SandboxConfig(port=0)) as server:
        histimport.load([source], config_for(server, tmp_path, failed_out=tmp_path / "f1.json"))
    write_jsonl(source, rows)
    with sandbox(SandboxConfig(port=0, fail_rate=1.0)) as down:
        config = config_for(down, tmp_path, failed_out=tmp_path / "f2.json", max_attempts=1)
        histimport.retry([tmp_path / "f1.json"], config)
    with sandbox(SandboxConfig(port=0)) as server:
        config = config_for(server, tmp_path, failed_out=tmp_path / "f3.json")
        result = histimport.retry([tmp_path / "f1.json", tmp_path / "f2.json"], config)
    assert result.exit_status is ExitStatus.OK, result.message
    assert orjson.loads((tmp_path / "f3.json").read_bytes())["failures"] == []


def test_a_load_stopped_while_reading_then_edited_above_is_read_again_whole(
    tmp_path: Path, server: RunningSandbox
) -> None:
    """Lines move when the user deletes a listed row; the retry of a load stopped while
    reading reads the source from its first line, so that no row is left behind."""
    rows = [message("d", "c", n) for n in range(6)]
    junk = {"departmentUUID": "d", "customerUUID": "c", "note": "junk"}
    source = write_jsonl(tmp_path / "e.jsonl", [rows[0], junk, *rows[1:]])
    with stopped_after(3):
        histimport.load([source], config_for(server, tmp_path))
    listed = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert (listed[-1]["line"], listed[-1]["errors"][0]["errorCode"]) == (4, "NOT_READ")
    write_jsonl(source, rows)  # the junk line deleted: every row below it one line up
    histimport.retry(
        [tmp_path / "failed.json"], config_for(server, tmp_path, failed_out=tmp_path / "r.json")
    )
    assert server.store.count() == len(rows) and server.store.duplicate_receipts() == 0
    # The junk's line holds a row listed at another line: deleted or moved, it cannot be
    # told, so its entry stays listed rather than be taken as done.
    again = orjson.loads((tmp_path / "r.json").read_bytes())["failures"]
    assert [(f["line"], f["stage"]) for f in again] == [(2, "rejected")]


def test_each_shard_of_a_source_that_breaks_off_lists_and_retries_its_own_rest(
    tmp_path: Path, server: RunningSandbox
) -> None:
    source, packed, rows = cut_off_gzip(tmp_path)
    for k in (0, 1):
        config = config_for(server, tmp_path, shard=(k, 2), failed_out=tmp_path / f"s{k}.json")
        result = histimport.load([source], replace(config, state_dir=tmp_path / f"state{k}"))
        assert result.exit_status is ExitStatus.INCOMPLETE  # shard 1 too read no further
        (entry,) = orjson.loads((tmp_path / f"s{k}.json").read_bytes())["failures"]
        assert (entry["errors"][0]["errorCode"], entry["shard"]) == ("UNREADABLE", f"{k}/2")
    source.write_bytes(packed)  # fetched again, whole
    config = config_for(server, tmp_path, state_dir=tmp_path / "state2")
    result = histimport.retry([tmp_path / "s0.json", tmp_path / "s1.json"], config)
    assert result.exit_status is ExitStatus.OK, result.message
    assert server.store.count() == len(rows) and server.store.duplicate_receipts() == 0


def test_a_source_that_breaks_off_earlier_than_it_did_says_so_again(
    tmp_path: Path, server: RunningSandbox
) -> None:
    source, packed, _ = cut_off_gzip(tmp_path)
    histimport.load([source], config_for(server, tmp_path))
    (first,) = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    source.write_bytes(packed[: len(packed) // 4])  # fetched again, and cut shorter
    result = histimport.retry(
        [tmp_path / "failed.json"], config_for(server, tmp_path, failed_out=tmp_path / "r.json")
    )
    assert result.exit_status is ExitStatus.INCOMPLETE
    (again,) = orjson.loads((tmp_path / "r.json").read_bytes())["failures"]
    assert again["errors"][0]["errorCode"] == "UNREADABLE" and again["line"] < first["line"]


def test_a_refused_message_read_again_from_the_top_is_listed_once(tmp_path: Path) -> None:
    rows = [message("d", f"c{n % 3}", n) for n in range(30)]
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    with sandbox(SandboxConfig(port=0, reject_rate=0.2)) as server:
        histimport.load([source], config_for(server, tmp_path, failed_out=tmp_path / "f1.json"))
        refused = len(orjson.loads((tmp_path / "f1.json").read_bytes())["failures"])
        with stopped_after(15):
            histimport.load([source], config_for(server, tmp_path, failed_out=tmp_path / "f2.json"))
        histimport.retry(
            [tmp_path / "f2.json"], config_for(server, tmp_path, failed_out=tmp_path / "r.json")
        )
    listed = orjson.loads((tmp_path / "r.json").read_bytes())
    places = [(f["source"], f["line"]) for f in listed["failures"]]
    assert 0 < len(places) == len(set(places)) == refused == listed["counts"]["failed"]


def test_a_fixed_repeat_is_not_taken_as_done_by_a_retry_stopped_before_it(
    tmp_path: Path, server: RunningSandbox
) -> None:
    rows = [message("d", "c", n) for n in range(10)]
    rows[6] = dict(rows[6], sourceUuid=rows[2]["sourceUuid"])  # line 7 repeats line 3's
    source = write_jsonl(tmp_path / "e.jsonl", rows)
    histimport.load([source], config_for(server, tmp_path, failed_out=tmp_path / "f1.json"))
    rows[6] = dict(rows[6], sourceUuid="d.c.fixed")
    write_jsonl(source, rows)
    with stopped_after(1):
        histimport.retry(
            [tmp_path / "f1.json"], config_for(server, tmp_path, failed_out=tmp_path / "f2.json")
        )
    listed = orjson.loads((tmp_path / "f2.json").read_bytes())["failures"]
    assert [f["line"] for f in listed] == [7]
    histimport.retry(
        [tmp_path / "f2.json"], config_for(server, tmp_path, failed_out=tmp_path / "f3.json")
    )
    assert server.store.count() == len(rows)


def test_a_source_that_breaks_off_again_is_listed_once_with_its_shard(
    tmp_path: Path, server: RunningSandbox
) -> None:
    """A retry stopped after the row for the break was staged; then a retry without --shard
    of a shard's failed file: the entry keeps the shard its rows were read for."""
    source, _, _ = cut_off_gzip(tmp_path)
    other = write_jsonl(tmp_path / "b.jsonl", [message("d", "b", n) for n in range(20)])
    config = config_for(server, tmp_path, shard=(0, 2), failed_out=tmp_path / "s0.json")
    histimport.load([source, other], config)
    (entry,) = orjson.loads((tmp_path / "s0.json").read_bytes())["failures"]
    with stopped_after(30):
        histimport.retry(
            [tmp_path / "s0.json"], config_for(server, tmp_path, failed_out=tmp_path / "r1.json")
        )
    histimport.retry(
        [tmp_path / "s0.json"], config_for(server, tmp_path, failed_out=tmp_path / "r2.json")
    )
    for name in ("r1.json", "r2.json"):
        broke = [
            f
            for f in orjson.loads((tmp_path / name).read_bytes())["failures"]
            if f["errors"][0]["errorCode"] == "UNREADABLE"
        ]
        assert [(f["line"], f["shard"]) for f in broke] == [(entry["line"], "0/2")], name


def test_a_retry_after_a_source_broke_off_reads_it_from_there_to_its_end(
    tmp_path: Path, server: RunningSandbox
) -> None:
    rows = [message("d", f"c{n % 7}", n) for n in range(3000)]
    whole = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    source = tmp_path / "e.jsonl.gz"
    packed = gzip.compress(whole)
    source.write_bytes(packed[: len(packed) // 2])
    first = histimport.load([source], config_for(server, tmp_path))
    listed = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert [f["errors"][0]["errorCode"] for f in listed] == ["UNREADABLE"]
    assert 0 < first.counts["accepted"] < len(rows)
    source.write_bytes(packed)  # fetched again, whole
    with stopped_after(100):
        stopped = histimport.retry(
            [tmp_path / "failed.json"],
            config_for(server, tmp_path, failed_out=tmp_path / "stopped.json"),
        )
    assert stopped.exit_status is ExitStatus.INTERRUPTED
    # Not known to be read to its end: the source is still wanted from where it broke off.
    assert listed[0] in orjson.loads((tmp_path / "stopped.json").read_bytes())["failures"]
    again = histimport.retry(
        [tmp_path / "stopped.json"],
        config_for(server, tmp_path, failed_out=tmp_path / "again.json"),
    )
    assert server.store.count() == len(rows)
    assert again.exit_status is ExitStatus.OK
    assert orjson.loads((tmp_path / "again.json").read_bytes())["failures"] == []


def test_a_resumed_run_records_what_it_passes_before_its_first_message_as_it_goes(
    tmp_path: Path, server: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Millions of rows accepted before may come before the first one to send: they are
    recorded a batch at a time while it is looked for, not held until it is found."""
    from histimport import run as run_module
    from histimport.staging import Staging

    rows = [message("d", f"c{n % 9}", n) for n in range(1000)]
    source = write_jsonl(tmp_path / "e.jsonl", rows[:700])
    config = config_for(server, tmp_path, fresh=True)
    assert histimport.load([source], config).exit_status is ExitStatus.OK
    monkeypatch.setattr(run_module, "HEAD_ROWS", 64)
    batches: list[int] = []
    admit = Staging.admit

    def counted(self: Staging, batch: Any) -> Any:
        batches.append(len(batch))
        return admit(self, batch)

    monkeypatch.setattr(Staging, "admit", counted)
    write_jsonl(source, rows)
    result = histimport.load([source], config)
    assert result.exit_status is ExitStatus.OK, result.message
    assert (result.report["alreadyAccepted"], result.report["accepted"]) == (700, 300)
    assert batches[: 700 // 64] == [64] * (700 // 64)  # while looking for the first
    assert server.store.count() == 1000 and server.store.duplicate_receipts() == 0
