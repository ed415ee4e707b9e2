"""Deterministic shards: N processes, each its own customers, together everything once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import yaml
from typer.testing import CliRunner

import histimport
from histimport import Config, ExitStatus
from histimport.cli import app
from histimport.errors import UsageError
from histimport.sandbox import SandboxConfig, sandbox
from histimport.shard import parse_shard, shard_of

from .conftest import REPO, config_for
from .factory import interleaved, write_jsonl

runner = CliRunner()


@pytest.mark.parametrize(
    ("department", "customer", "of_3", "of_7", "of_1000"),
    [
        ("sales-emea", "c-1042", 1, 6, 373),
        ("billing", "legacy-7000", 1, 4, 567),
        ("dep-0", "cust-00000", 0, 4, 451),
        ("support-nordics", "3a0a457f-82aa-536a-a493-13d1d851abec", 0, 6, 914),
        ("d", "c", 2, 0, 452),
    ],
)
def test_the_assignment_is_pinned(
    department: str, customer: str, of_3: int, of_7: int, of_1000: int
) -> None:
    """These numbers must never change: shards of a running migration depend on them."""
    assert [shard_of(department, customer, n) for n in (3, 7, 1000)] == [of_3, of_7, of_1000]


def test_the_assignment_is_the_same_in_another_process() -> None:
    code = "from histimport.shard import shard_of; print(shard_of('sales-emea', 'c-1042', 1000))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "373"


def test_shard_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_shard("2/3", None) == (2, 3)
    assert parse_shard(None, None) is None
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert parse_shard(None, 4) == (1, 4)
    for spec, shards in (("3/3", None), ("x", None), ("1/3", 4)):
        with pytest.raises(UsageError):
            parse_shard(spec, shards)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(UsageError, match="JOB_COMPLETION_INDEX"):
        parse_shard(None, 4)


def test_three_shard_processes_store_everything_once(tmp_path: Path) -> None:
    rows = list(interleaved(customers=300, per_customer=100))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    db = tmp_path / "sandbox.sqlite3"
    with sandbox(SandboxConfig(port=0, db=db, fail_rate=0.05, seed=11)) as server:
        env = {
            **os.environ,
            "HISTIMPORT_USERNAME": "u",
            "HISTIMPORT_PASSWORD": "p",
            "HISTIMPORT_BASE_URL": server.base_url,
        }
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "histimport",
                    "load",
                    str(source),
                    "--shard",
                    f"{k}/3",
                    "--max-attempts",
                    "1",
                    "--quiet",
                ],
                cwd=tmp_path,
                env=env,
                stderr=subprocess.PIPE,
            )
            for k in range(3)
        ]
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode in (0, 1), stderr
        failed_files = sorted(tmp_path.glob("failed.shard-*-of-3.json"))
        assert [f.name for f in failed_files] == [f"failed.shard-{k}-of-3.json" for k in range(3)]
        assert all((tmp_path / f".histimport-shard-{k}-of-3").is_dir() for k in range(3))
        listed = set()
        for failed in failed_files:
            for entry in orjson.loads(failed.read_bytes())["failures"]:
                listed.add(entry["sourceUuid"])
        stored = [m.source_uuid for m in server.store.messages()]
        assert len(stored) == len(set(stored))
        assert set(stored) | listed == {r["sourceUuid"] for r in rows}
        assert listed and not set(stored) & listed
        by_customer: dict[str, list[str]] = defaultdict(list)
        for m in server.store.messages():
            by_customer[m.customer].append(m.source_uuid)
        assert all(uuids == sorted(uuids) for uuids in by_customer.values())
    with sandbox(SandboxConfig(port=0, db=db)) as healed:
        result = histimport.retry(
            failed_files,
            Config(
                base_url=healed.base_url,
                username="u",
                password="p",
                state_dir=tmp_path / "retry-state",
                failed_out=tmp_path / "retry.json",
            ),
        )
        assert result.exit_status is ExitStatus.OK
        assert result.counts["read"] == len(listed)
        assert healed.store.count() == 30_000 and healed.store.duplicate_receipts() == 0


def test_validate_shows_the_balance(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "e.jsonl", list(interleaved(customers=60, per_customer=7)))
    result = runner.invoke(
        app,
        [
            "validate",
            str(tmp_path / "e.jsonl"),
            "--shards",
            "4",
            "--output",
            "json",
            "--failed-out",
            str(tmp_path / "f.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    shards = orjson.loads(result.stdout)["shards"]
    assert [s["shard"] for s in shards] == [0, 1, 2, 3]
    assert sum(s["messages"] for s in shards) == 420
    assert sum(s["customers"] for s in shards) == sum(s["requests"] for s in shards) == 60
    assert all(s["customers"] > 5 for s in shards)


def test_the_kubernetes_manifest_is_an_indexed_job() -> None:
    manifest = yaml.safe_load((REPO / "docs" / "kubernetes-job.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    spec = manifest["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    (container,) = spec["template"]["spec"]["containers"]
    command = " ".join(container["args"])
    assert f"--shards {spec['completions']}" in command
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e
    }
    assert set(secrets) == {"HISTIMPORT_USERNAME", "HISTIMPORT_PASSWORD"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/state" in mounts and "--state-dir /state/ledger" in command


def test_the_github_matrix_example_parses() -> None:
    workflow = yaml.safe_load((REPO / "docs" / "github-actions-matrix.yml").read_text())
    job = workflow["jobs"]["import"]
    assert job["strategy"]["matrix"]["shard"] == [0, 1, 2]
    assert any("--shard ${{ matrix.shard }}/3" in step.get("run", "") for step in job["steps"])


def test_a_shard_s_retry_lists_the_other_shards_entries_again(tmp_path: Path) -> None:
    """`retry --shard 0/2` of a failed file that lists every shard's messages sends its own
    and lists the others' again: none drops out of the new failed file."""
    rows = list(interleaved(customers=20, per_customer=5))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, fail_rate=1.0)) as down:
        loaded = histimport.load([source], config_for(down, tmp_path, max_attempts=1))
        assert loaded.counts["accepted"] == 0
    with sandbox(SandboxConfig(port=0)) as healed:
        result = histimport.retry(
            [tmp_path / "failed.json"],
            config_for(healed, tmp_path, failed_out=tmp_path / "retry.json", shard=(0, 2)),
        )
        stored = {m.source_uuid for m in healed.store.messages()}
    ours = {
        r["sourceUuid"] for r in rows if shard_of(r["departmentUUID"], r["customerUUID"], 2) == 0
    }
    assert stored == ours and result.counts["accepted"] == len(ours)
    listed = {
        f["sourceUuid"] for f in orjson.loads((tmp_path / "retry.json").read_bytes())["failures"]
    }
    assert listed == {r["sourceUuid"] for r in rows} - ours
