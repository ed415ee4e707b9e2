"""What a run hands over besides its failures: the map of old ids to new ones
(`--accepted-out`, `status --accepted`), and the platform's warnings by code."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson
from typer.testing import CliRunner

from histimport.cli import app
from histimport.sandbox import RunningSandbox

from .factory import interleaved, message, write_jsonl

CREDENTIALS = {"HISTIMPORT_USERNAME": "importer", "HISTIMPORT_PASSWORD": "pw"}


def load(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["load", *args, "-q"], env=CREDENTIALS)
    return result.exit_code, result.output


def stored(server: RunningSandbox) -> dict[str, tuple[str, str, str]]:
    """sourceUuid -> (messageUuid, department, customer), as the platform stored them."""
    return {
        m.source_uuid: (m.message_uuid, m.department, m.customer) for m in server.store.messages()
    }


def test_accepted_out_lists_exactly_what_the_platform_accepted_with_its_ids(
    workdir: Path, server: RunningSandbox
) -> None:
    rows = list(interleaved(customers=4, per_customer=5))
    rows.append({"customerUUID": "c", "sourceUuid": "no-department"})  # rejected
    write_jsonl(workdir / "e.jsonl", rows[:10])
    code, output = load("e.jsonl", "--base-url", server.base_url, "--accepted-out", "a.jsonl")
    assert code == 0, output
    first = [orjson.loads(line) for line in (workdir / "a.jsonl").read_bytes().splitlines()]
    write_jsonl(workdir / "f.jsonl", rows)  # the first ten again, then ten more and a bad row
    code, output = load("f.jsonl", "--base-url", server.base_url, "--accepted-out", "b.jsonl")
    assert code == 1, output
    second = [orjson.loads(line) for line in (workdir / "b.jsonl").read_bytes().splitlines()]
    platform = stored(server)
    for lines, expected in ((first, rows[:10]), (second, rows[10:20])):
        assert sorted(line["sourceUuid"] for line in lines) == sorted(
            r["sourceUuid"] for r in expected
        )
        for line in lines:
            assert platform[line["sourceUuid"]] == (
                line["messageUuid"],
                line["departmentUUID"],
                line["customerUUID"],
            )

    result = CliRunner().invoke(app, ["status", "--accepted", "all.csv"])
    assert result.exit_code == 0, result.output
    with (workdir / "all.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 20 == len(platform)
    assert {r["sourceUuid"]: r["messageUuid"] for r in table} == {
        uuid: ids[0] for uuid, ids in platform.items()
    }
    assert {r["target"] for r in table} == {server.base_url}


def test_an_accepted_csv_is_safe_to_open_in_a_spreadsheet(
    workdir: Path, server: RunningSandbox
) -> None:
    write_jsonl(
        workdir / "e.jsonl",
        [message("-dept", "-cust", 1), message("d", "c", 2, sourceUuid="=HYPERLINK(1)")],
    )
    code, output = load("e.jsonl", "--base-url", server.base_url, "--accepted-out", "a.csv")
    assert code == 0, (output, (workdir / "failed.json").read_text())
    with (workdir / "a.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted((r["sourceUuid"], r["departmentUUID"], r["customerUUID"]) for r in table) == [
        ("'-dept.-cust.000001", "'-dept", "'-cust"),
        ("'=HYPERLINK(1)", "d", "c"),
    ]


def test_the_platform_s_warnings_are_reported_by_code_and_message(
    workdir: Path, server: RunningSandbox
) -> None:
    rows = list(interleaved(customers=2, per_customer=3))
    write_jsonl(workdir / "e.jsonl", rows)
    assert load("e.jsonl", "--base-url", server.base_url)[0] == 0
    # Sent again from a state dir that knows none of it: the platform stores nothing twice
    # and says so in a warning per message.
    result = CliRunner().invoke(
        app,
        [
            "load",
            "e.jsonl",
            "--base-url",
            server.base_url,
            "--state-dir",
            "other",
            "--report",
            "r.json",
        ],
        env=CREDENTIALS,
    )
    assert result.exit_code == 0, result.output
    warnings = orjson.loads((workdir / "r.json").read_bytes())["platformWarnings"]
    assert warnings["byCode"] == {"DUPLICATE_SOURCE_UUID": 6}
    assert sorted(w["sourceUuid"] for w in warnings["listed"]) == sorted(
        r["sourceUuid"] for r in rows
    )
    assert "platform warnings: DUPLICATE_SOURCE_UUID 6" in result.output


def test_no_command_replaces_the_failed_file_of_another_import(
    workdir: Path, server: RunningSandbox
) -> None:
    rows = [*interleaved(customers=2, per_customer=3), {"sourceUuid": "no-ids"}]
    write_jsonl(workdir / "e.jsonl", rows)
    assert load("e.jsonl", "--base-url", server.base_url)[0] == 1
    written = (workdir / "failed.json").read_bytes()
    head = orjson.loads(written)
    assert head["command"] == "load"
    assert head["stateDir"] == str((workdir / ".histimport").resolve())

    checked = CliRunner().invoke(app, ["validate", "e.jsonl", "--failed-out", "failed.json"])
    assert checked.exit_code == 2 and "is not replaced" in checked.output
    other = load("e.jsonl", "--base-url", server.base_url, "--state-dir", "other")
    assert other[0] == 2 and "state dir" in other[1]
    assert (workdir / "failed.json").read_bytes() == written

    # The same import's next run, or its retry, replaces it.
    retried = CliRunner().invoke(
        app, ["retry", "failed.json", "--base-url", server.base_url, "-q"], env=CREDENTIALS
    )
    assert retried.exit_code == 1, retried.output
    assert orjson.loads((workdir / "failed.json").read_bytes())["command"] == "retry"


def test_out_dir_gives_each_run_a_folder_of_its_own(workdir: Path, server: RunningSandbox) -> None:
    write_jsonl(workdir / "e.jsonl", interleaved(customers=2, per_customer=3))
    for _ in range(2):
        code, output = load("e.jsonl", "--base-url", server.base_url, "--out-dir", "runs")
        assert code == 0, output
    first, second = sorted((workdir / "runs").iterdir())
    assert first.name.endswith("-run1") and second.name.endswith("-run2")
    for folder, accepted in ((first, 6), (second, 0)):
        assert sorted(p.name for p in folder.iterdir()) == [
            "accepted.jsonl",
            "failed.json",
            "report.json",
        ]
        assert len((folder / "accepted.jsonl").read_bytes().splitlines()) == accepted
        assert orjson.loads((folder / "report.json").read_bytes())["accepted"] == accepted
    assert not (workdir / "failed.json").exists()


def test_retry_and_status_say_what_was_carried_over_and_how_a_run_ended(
    workdir: Path,
) -> None:
    from histimport.sandbox import SandboxConfig, sandbox

    write_jsonl(workdir / "e.jsonl", [*interleaved(customers=4, per_customer=10), {"x": 1}])
    with sandbox(SandboxConfig(port=0, reject_rate=0.25)) as server:
        code, output = load("e.jsonl", "--base-url", server.base_url)
        assert code == 1, output
        refused = orjson.loads((workdir / "failed.json").read_bytes())["counts"]["failed"]
        assert refused > 0
        result = CliRunner().invoke(
            app,
            ["retry", "failed.json", "--base-url", server.base_url, "--report", "r.json"],
            env=CREDENTIALS,
        )
    assert result.exit_code == 1, result.output
    assert (
        f"listed again unchanged: {refused} messages the platform refused for good" in result.output
    )
    assert "--include-permanent sends them" in result.output
    report = orjson.loads((workdir / "r.json").read_bytes())
    assert report["carriedOver"] == {"refusedForGood": refused, "notRead": 0, "notFound": 0}
    status = CliRunner().invoke(app, ["status"])
    assert f"finished; its failed file lists {refused} failed" not in status.output
    lines = [line for line in status.output.splitlines() if line.startswith("  run ")]
    assert lines[0].endswith(
        f"finished; its failed file lists 1 rejected, {refused} carried over from earlier "
        "failed files"
    ), lines
    assert lines[1].endswith(f"finished; its failed file lists 1 rejected, {refused} failed")


def test_a_check_s_failed_file_gives_way_and_so_do_many_sources(
    workdir: Path, server: RunningSandbox
) -> None:
    rows = [*interleaved(customers=2, per_customer=2), {"sourceUuid": "no-ids"}]
    write_jsonl(workdir / "e.jsonl", rows)
    dry = CliRunner().invoke(app, ["load", "e.jsonl", "--dry-run", "-q"])
    assert dry.exit_code == 1, dry.output
    assert orjson.loads((workdir / "failed.json").read_bytes())["stateDir"] is None
    assert load("e.jsonl", "--base-url", server.base_url)[0] == 1  # a check gives way
    # Its owner is found before its sources, however many they are.
    many = [write_jsonl(workdir / f"s{n}.jsonl", [{"sourceUuid": f"x{n}"}]) for n in range(400)]
    code, output = load(*map(str, many), "--base-url", server.base_url, "--failed-out", "m.json")
    assert code == 1, output
    assert (workdir / "m.json").stat().st_size > 64 * 1024
    other = load(
        "e.jsonl", "--base-url", server.base_url, "--state-dir", "b", "--failed-out", "m.json"
    )
    assert other[0] == 2 and "is not replaced" in other[1]


def test_out_dir_folders_of_one_second_do_not_collide(workdir: Path) -> None:
    write_jsonl(workdir / "e.jsonl", interleaved(customers=2, per_customer=2))
    for _ in range(3):  # a check's run is always run 1 of its own ledger
        result = CliRunner().invoke(app, ["validate", "e.jsonl", "--out-dir", "out", "-q"])
        assert result.exit_code == 0, result.output
    assert len(list((workdir / "out").iterdir())) == 3


def test_status_reads_a_journal_an_earlier_version_left(
    workdir: Path, server: RunningSandbox
) -> None:
    import sqlite3

    write_jsonl(workdir / "e.jsonl", [*interleaved(customers=2, per_customer=2), {"x": 1}])
    assert load("e.jsonl", "--base-url", server.base_url)[0] == 1
    journal = sqlite3.connect(workdir / ".histimport" / "journal.sqlite3")
    journal.execute("ALTER TABLE journal DROP COLUMN department")
    journal.execute("ALTER TABLE journal DROP COLUMN customer")
    journal.commit()
    journal.close()
    status = CliRunner().invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    assert ": 4 accepted" in status.output
    assert load("e.jsonl", "--base-url", server.base_url)[0] == 1  # and a run resumes it
