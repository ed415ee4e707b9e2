"""Inputs as they really come: hostile JSONL, CSV, mapping files, gzip, stdin, validate."""

from __future__ import annotations

import csv
import gzip
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

import histimport
from histimport import Config, ExitStatus
from histimport.cli import app
from histimport.errors import SourceError
from histimport.mapping import parse_time
from histimport.run import Silent
from histimport.sandbox import RunningSandbox, SandboxConfig, sandbox

from .conftest import REPO, config_for
from .factory import interleaved, message, stopped_after, write_jsonl

runner = CliRunner()
SAMPLES = REPO / "samples"


def good(n: int, **extra: Any) -> bytes:
    return orjson.dumps(message("dep", "cust", n, **extra))


HOSTILE: list[tuple[bytes, str | None]] = [
    (good(1), None),
    (
        b'{"departmentUUID": "dep", "customerUUID": "cust", "sourceUuid": "t-1", "sentOn": "2024',
        "INVALID_JSON",
    ),
    (
        orjson.dumps({k: v for k, v in message("dep", "cust", 2).items() if k != "sourceUuid"}),
        "MISSING_FIELD",
    ),
    (good(3, sentOn="31/02/2024 10:00"), "INVALID_TIMESTAMP"),
    (orjson.dumps(message("dep", "a/b", 4)), "INVALID_ID"),
    (orjson.dumps(message("..", "cust", 5)), "INVALID_ID"),
    (orjson.dumps(message("dep", "x?y=1", 6)), "INVALID_ID"),
    (orjson.dumps(message("dep", "x#frag", 7)), "INVALID_ID"),
    (orjson.dumps(message("", "cust", 8)), "INVALID_ID"),
    (good(9, messageAttributes={"isManual": "perhaps"}), "INVALID_FIELD"),
    (good(10, voiceCallAttributes={"callStatus": "two"}), "INVALID_FIELD"),
    (b"[1, 2, 3]", "NOT_AN_OBJECT"),
    (
        b'{"departmentUUID": "dep", "customerUUID": "cust", "sourceUuid": "u-\xff\xfe"}',
        "INVALID_UTF8",
    ),
    (good(1), "DUPLICATE_SOURCE_UUID"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "TOO_DEEP"),
    (b"", None),
    (b"   ", None),
    (good(11), None),
]


def hostile_file(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in HOSTILE) + b"\n")
    expected = {n + 1: code for n, (_, code) in enumerate(HOSTILE) if code is not None}
    return path, expected


def test_hostile_jsonl_validate_names_exactly_the_bad_lines(tmp_path: Path) -> None:
    path, expected = hostile_file(tmp_path)
    result = histimport.validate([path], Config(failed_out=tmp_path / "failed.json"))
    assert result.exit_status is ExitStatus.INCOMPLETE
    failures = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert {f["line"]: f["errors"][0]["errorCode"] for f in failures} == expected
    assert all(f["stage"] == "rejected" and f["source"] == str(path) for f in failures)
    by_line = {f["line"]: f for f in failures}
    assert by_line[4]["errors"][0]["errorDescription"].startswith('sentOn: "31/02/2024 10:00"')
    assert by_line[5]["errors"][0]["errorDescription"].startswith('customerUUID: "a/b"')
    assert by_line[14]["errors"][0]["errorDescription"].endswith("already read at line 1")
    assert result.counts["read"] == len(HOSTILE) - 2  # blank lines are not counted


def test_a_repeat_of_a_rejected_row_s_source_uuid_is_a_duplicate(tmp_path: Path) -> None:
    """The first row with a sourceUuid is the one it names, valid or not: a later valid row
    with it is not sent in its place (which of the two was meant is the user's call)."""
    bad = "31/02/2024 10:00"
    lines = [good(1, sentOn=bad), good(1), good(2), good(2, sentOn=bad)]
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = histimport.validate([path], Config(failed_out=tmp_path / "failed.json"))
    failures = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert {f["line"]: f["errors"][0]["errorCode"] for f in failures} == {
        1: "INVALID_TIMESTAMP",
        2: "DUPLICATE_SOURCE_UUID",
        4: "INVALID_TIMESTAMP",
    }
    assert failures[1]["errors"][0]["errorDescription"].endswith("already read at line 1")
    assert (result.counts["read"], result.counts["rejected"]) == (4, 3)


def test_validate_stopped_while_reading_says_nothing_of_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", list(interleaved(customers=5, per_customer=8)))
    with stopped_after(0):
        result = histimport.validate([path], Config(failed_out=tmp_path / "failed.json"))
    assert result.exit_status is ExitStatus.INTERRUPTED
    assert result.message is not None and "retry" not in result.message


def test_hostile_jsonl_load_sends_only_good_rows_to_the_endpoint(tmp_path: Path) -> None:
    path, _ = hostile_file(tmp_path)
    journal = tmp_path / "journal.jsonl"
    with sandbox(SandboxConfig(port=0, journal=journal)) as server:
        result = histimport.load([path], config_for(server, tmp_path))
        stored = sorted(m.source_uuid for m in server.store.messages())
    assert result.exit_status is ExitStatus.INCOMPLETE
    assert stored == ["dep.cust.000001", "dep.cust.000011"]
    paths = {orjson.loads(line)["path"] for line in journal.read_bytes().splitlines()}
    assert paths == {"/communications/department/dep/customer/cust/communication/historical"}


def test_validate_outputs_for_ci(tmp_path: Path, workdir: Path) -> None:
    path, expected = hostile_file(workdir)
    result = runner.invoke(app, ["validate", path.name, "--output", "github"])
    assert result.exit_code == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("::error ")]
    assert len(errors) == len(expected)
    assert errors[0].startswith(f"::error file={path.name},line=2::line is not valid JSON")
    result = runner.invoke(app, ["validate", path.name, "--output", "json"])
    document = orjson.loads(result.stdout)
    assert document["counts"]["rejected"] == len(expected)
    assert document["plan"] == {
        "requests": 1,
        "messages": 2,
        "customers": [
            {"departmentUUID": "dep", "customerUUID": "cust", "messages": 2, "requests": 1}
        ],
    }
    write_jsonl(workdir / "fine.jsonl", [message("d", "c", 1)])
    assert runner.invoke(app, ["validate", "fine.jsonl"]).exit_code == 0


def test_warnings_are_reported_and_block_only_with_strict(tmp_path: Path, workdir: Path) -> None:
    rows = [
        message("d", "c", 1, receivedOn="2023-01-01T00:00:00Z"),
        message("d", "c", 2, sentOn="2999-01-01T00:00:00Z"),
        message("d", "c", 3, messageAttributes={"protocol": "SMS"}),
        message("d", "c", 4),
        message("d", "c", 5, messageAttributes={"protocol": "SMS"}, voiceCallAttributes=None),
    ]
    write_jsonl(workdir / "w.jsonl", rows)
    result = runner.invoke(app, ["validate", "w.jsonl", "--output", "github"])
    assert result.exit_code == 0
    warnings = [line for line in result.stdout.splitlines() if line.startswith("::warning")]
    assert [w.split("::")[1] for w in warnings] == [
        "warning file=w.jsonl,line=1",
        "warning file=w.jsonl,line=2",
        "warning file=w.jsonl,line=3",
        "warning file=w.jsonl,line=5",
    ]
    strict = runner.invoke(app, ["validate", "w.jsonl", "--strict", "--output", "json"])
    assert strict.exit_code == 1
    codes = [r["errors"][0]["errorCode"] for r in orjson.loads(strict.stdout)["rejected"]]
    assert codes == ["RECEIVED_BEFORE_SENT", "IN_THE_FUTURE", "EMPTY_MESSAGE", "EMPTY_MESSAGE"]


def test_csv_bodies_arrive_byte_for_byte(server: RunningSandbox, tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    bodies = {}
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(
            [
                "departmentUUID",
                "customerUUID",
                "sourceUuid",
                "sentOn",
                "messageAttributes.body",
                "messageAttributes.isManual",
                "messageAttributes.tags",
                "voiceCallAttributes.callStatus",
            ]
        )
        for n in range(5000):
            body = f'row {n}, with a comma;\nand a new line, "quotes" and ünïcödé  '
            if n % 7 == 0:
                body = f"  leading and trailing spaces {n}\r\n\tkept  "
            bodies[f"csv-{n}"] = body
            writer.writerow(
                [
                    "dep",
                    f"c{n % 50}",
                    f"csv-{n}",
                    "2024-05-01T10:00:00+02:00",
                    body,
                    ["yes", "No", "TRUE", "0"][n % 4],
                    '["a", "b"]',
                    n % 3,
                ]
            )
    result = histimport.load([path], config_for(server, tmp_path))
    assert result.exit_status is ExitStatus.OK, result.preview
    stored = {m.source_uuid: m.body for m in server.store.messages()}
    assert len(stored) == 5000
    for uuid, body in bodies.items():
        assert stored[uuid]["messageAttributes"]["body"] == body
    sample = stored["csv-5"]
    assert sample["messageAttributes"]["isManual"] is False  # "No"
    assert sample["messageAttributes"]["tags"] == ["a", "b"]
    assert sample["voiceCallAttributes"]["callStatus"] == 2
    assert sample["sentOn"] == "2024-05-01T08:00:00.000Z"


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_csv_delimiter_is_sniffed_and_lines_are_physical(tmp_path: Path, delimiter: str) -> None:
    header = ["departmentUUID", "customerUUID", "sourceUuid", "messageAttributes.body"]
    lines = [
        delimiter.join(header),
        "",
        delimiter.join(["d", "c", "s1", '"two\nlines"']),
        delimiter.join(["d", "c", "s2", "x"]) + delimiter + "extra",
        delimiter.join(["d", "c/x", "s3", "y"]),
    ]
    path = tmp_path / "e.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = histimport.validate([path], Config(failed_out=tmp_path / "failed.json"))
    failures = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert [(f["line"], f["errors"][0]["errorCode"]) for f in failures] == [
        (5, "INVALID_CSV"),
        (6, "INVALID_ID"),
    ]
    assert result.counts["read"] == 3


def test_csv_encodings(tmp_path: Path) -> None:
    text = "departmentUUID,customerUUID,sourceUuid,messageAttributes.body\nd,c,s1,Grüße\n"
    for name, data in {
        "bom.csv": b"\xef\xbb\xbf" + text.encode(),
        "utf16.csv": text.encode("utf-16"),
        "bad.csv": text.encode() + b"d,c,s2,\xff\xfe\n",
    }.items():
        (tmp_path / name).write_bytes(data)
        result = histimport.validate([tmp_path / name], Config(failed_out=tmp_path / "f.json"))
        failures = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
        if name == "bad.csv":
            assert [(f["line"], f["errors"][0]["errorCode"]) for f in failures] == [
                (3, "INVALID_UTF8")
            ]
        else:
            assert failures == [] and result.counts["read"] == 1, name


def test_csv_with_unknown_columns_needs_a_mapping(workdir: Path) -> None:
    (workdir / "e.csv").write_text("ticket,text\n1,hello\n")
    result = runner.invoke(app, ["validate", "e.csv"])
    assert result.exit_code == 2
    assert "'ticket', 'text' are not fields" in result.output
    assert "histimport map init e.csv" in result.output


def test_the_legacy_sample_imports_with_its_mapping(server: RunningSandbox, tmp_path: Path) -> None:
    result = histimport.load(
        [SAMPLES / "legacy-helpdesk.csv"],
        config_for(server, tmp_path, map_file=SAMPLES / "legacy-helpdesk.map.toml"),
    )
    assert result.exit_status is ExitStatus.OK, result.preview
    stored = {m.source_uuid: m for m in server.store.messages()}
    first = stored["helpdesk-40101-1"]
    assert (first.department, first.customer) == ("support-nordics", "legacy-7000")
    # 29/03/2025 22:10 in Berlin is CET (+01:00).
    assert first.body["sentOn"] == "2025-03-29T21:10:00.000Z"
    assert first.body["messageAttributes"]["protocol"] == "SMS"
    assert first.body["messageAttributes"]["type"] == "INBOUND"
    assert first.body["messageAttributes"]["metaData"] == {
        "ticket": "40101",
        "customerName": "Anna Berg",
    }
    assert "userUuid" not in first.body and stored["helpdesk-40101-2"].body["userUuid"] == "agent-0"
    with (SAMPLES / "legacy-helpdesk.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(stored) == len(rows)
    assert {r["text"] for r in rows} == {
        m.body["messageAttributes"]["body"] for m in stored.values()
    }


@pytest.mark.parametrize(
    ("local", "utc"),
    [
        ("30/03/2025 01:59", "2025-03-30T00:59:00+00:00"),  # CET, before the spring change
        ("30/03/2025 03:00", "2025-03-30T01:00:00+00:00"),  # CEST, after it
        ("26/10/2025 01:30", "2025-10-25T23:30:00+00:00"),  # CEST
        ("26/10/2025 02:30", "2025-10-26T00:30:00+00:00"),  # ambiguous: the first (CEST) one
        ("26/10/2025 03:30", "2025-10-26T02:30:00+00:00"),  # CET, after the autumn change
    ],
)
def test_local_times_across_daylight_saving(local: str, utc: str) -> None:
    from datetime import UTC
    from zoneinfo import ZoneInfo

    moment = parse_time(local, "%d/%m/%Y %H:%M", ZoneInfo("Europe/Berlin"))
    assert moment is not None and moment.astimezone(UTC).isoformat() == utc


def test_epoch_and_iso_forms() -> None:
    assert parse_time("1700000000", "epoch", None).isoformat() == "2023-11-14T22:13:20+00:00"  # type: ignore[union-attr]
    assert parse_time(1700000000123, "epoch_ms", None).microsecond == 123000  # type: ignore[union-attr]
    assert parse_time("2024-01-01T10:00:00", "iso", None) is None  # naive and no tz


def test_map_init_prints_a_usable_starter(workdir: Path) -> None:
    result = runner.invoke(app, ["map", "init", str(SAMPLES / "legacy-helpdesk.csv")])
    assert result.exit_code == 0
    assert '"messageAttributes.body" = "text"' in result.stdout
    assert 'sentOn = { column = "created_at"' in result.stdout
    assert '# "messageAttributes.metaData.first_name" = "first_name"' in result.stdout
    import tomllib

    assert "fields" in tomllib.loads(result.stdout)


def test_generated_source_uuids_are_stable(tmp_path: Path) -> None:
    rows = [{k: v for k, v in message("d", "c", n).items() if k != "sourceUuid"} for n in range(3)]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    config = Config(failed_out=tmp_path / "f.json", generate_source_uuid=True)
    first = histimport.validate([path], config)
    assert first.exit_status is ExitStatus.OK
    plans = []
    for _ in range(2):
        with sandbox(SandboxConfig(port=0)) as server:
            histimport.load(
                [path], config_for(server, tmp_path / str(len(plans)), generate_source_uuid=True)
            )
            plans.append(sorted(m.source_uuid for m in server.store.messages()))
    assert plans[0] == plans[1] and len(set(plans[0])) == 3


def test_gzip_and_stdin_import_like_the_plain_file(tmp_path: Path) -> None:
    rows = [message(f"d{n % 2}", f"c{n % 5}", n) for n in range(200)]
    plain = write_jsonl(tmp_path / "e.jsonl", rows)
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "e.csv.gz").write_bytes(gzip.compress(b"departmentUUID,customerUUID,sourceUuid\n"))
    stored = []
    for variant in ("plain", "gz", "stdin"):
        with sandbox(SandboxConfig(port=0)) as server:
            base = [
                "-m",
                "histimport",
                "load",
                "--base-url",
                server.base_url,
                "--state-dir",
                str(tmp_path / variant),
                "--failed-out",
                str(tmp_path / f"{variant}.json"),
            ]
            args = {
                "plain": [str(plain)],
                "gz": [str(tmp_path / "e.jsonl.gz")],
                "stdin": ["-", "--format", "jsonl"],
            }[variant]
            env = {**os.environ, "HISTIMPORT_USERNAME": "u", "HISTIMPORT_PASSWORD": "p"}
            done = subprocess.run(
                [sys.executable, *base, *args],
                input=plain.read_bytes() if variant == "stdin" else None,
                env=env,
                capture_output=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            messages = [(m.department, m.customer, m.body) for m in server.store.messages()]
            stored.append(sorted(messages, key=lambda m: m[:2]))  # stable: per-customer order
    assert stored[0] == stored[1] == stored[2] and len(stored[0]) == 200


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (
            b"sourceUuid,departmentUUID,\xffcustomerUUID\n",
            "line 1: the header row: line 1 is not valid UTF-8",
        ),
        (
            b"sourceUuid,sourceUuid,departmentUUID,customerUUID\n",
            "'sourceUuid' appear more than once",
        ),
        (b'"sourceUuid,departmentUUID\n', "the header row is not valid CSV"),
        (
            b"sourceUuid,departmentUUID,customerUUID\rs0,d,c\r",
            "convert them, e.g. with tr '\\r' '\\n'",
        ),
    ],
)
def test_a_header_that_cannot_be_read_stops_the_run_before_sending(
    workdir: Path, header: bytes, says: str
) -> None:
    (workdir / "e.csv").write_bytes(header + b"s1,d,c\ns2,d,c\n")
    result = runner.invoke(app, ["load", "e.csv", "--sandbox"])
    assert result.exit_code == 2, result.output
    assert f"e.csv: {says}"[:40] in result.output or says in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["load", "validate"])
def test_a_json_array_over_several_lines_stops_the_run_before_sending(
    workdir: Path, command: str
) -> None:
    rows = [orjson.dumps(message("d", "c", n)).decode() for n in range(3)]
    (workdir / "e.json").write_text("\n  [\n" + ",\n".join(rows) + "\n]\n")
    args = [command, "e.json"] + (["--sandbox"] if command == "load" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "e.json: line 2: a JSON array over several lines, not JSON Lines" in result.output
    assert "jq -c '.[]'" in result.output
    assert "Traceback" not in result.output


def test_a_source_refused_while_staging_ends_the_run_as_a_usage_error(workdir: Path) -> None:
    write_jsonl(workdir / "ok.jsonl", [message("d", "c", n) for n in range(3)])
    (workdir / "e.json").write_text("[\n" + orjson.dumps(message("d", "c", 9)).decode() + "\n]\n")
    result = runner.invoke(app, ["load", "ok.jsonl", "e.json", "--sandbox", "--state-dir", "st"])
    assert result.exit_code == 2, result.output
    status = runner.invoke(app, ["status", "--state-dir", "st"])
    assert status.exit_code == 0, status.output
    assert "load" in status.output and ": stopped by a usage error" in status.output
    assert "killed" not in status.output


@pytest.mark.parametrize(
    "layout",
    [
        "[\n{row},\n{row}\n]",  # json.dump(indent=...) and jq
        "[ {{\n  {fields}\n}}, {{\n  {fields}\n}} ]",  # Jackson's pretty printer
        "[\t{{\n{fields}}}]",
        '[{{{fields},\n"messageAttributes": {{"body": "x"}}}}]',
        "[{row},\n{row},\n{row}]",  # an element a line
        "[{row}\n,{row}\n,{row}]",  # an element a line, commas first
    ],
)
def test_every_layout_of_a_json_array_is_told(tmp_path: Path, layout: str) -> None:
    row = orjson.dumps(message("d", "c", 1)).decode()
    fields = row[1:-1]
    path = tmp_path / "e.json"
    path.write_bytes(b"\xef\xbb\xbf\n" + layout.format(row=row, fields=fields).encode())
    with pytest.raises(SourceError, match=r"e\.json: line 2: a JSON array over several lines"):
        histimport.validate([path], Config(failed_out=tmp_path / "f.json"))


def test_a_json_line_holding_an_array_is_one_rejected_row(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    array = orjson.dumps([message("d", "c", 1)])
    path.write_bytes(array + b"\n" + orjson.dumps(message("d", "c", 2)) + b"\n" + array + b"\n")
    assert failures_of(tmp_path, path) == [(1, "NOT_AN_OBJECT"), (3, "NOT_AN_OBJECT")]


def test_a_column_named_like_an_internal_key_is_just_a_column(workdir: Path) -> None:
    (workdir / "e.jsonl").write_text(
        '{"departmentUUID": "d", "customerUUID": "c", "sourceUuid": "s", "__header__": []}\n'
    )
    result = runner.invoke(app, ["validate", "e.jsonl", "--output", "json"])
    assert result.exit_code == 1
    (rejected,) = orjson.loads(result.stdout)["rejected"]
    assert (
        rejected["errors"][0]["errorDescription"]
        == "__header__: is not a field of the API's message"
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--encoding", "bogus"], "not a known encoding"),
        (["--encoding", "hex"], "not a text encoding"),
        (["--delimiter", "ab"], "one ASCII character"),
        (["--delimiter", "\u00fe"], "one ASCII character"),
    ],
)
def test_bad_csv_options_are_usage_errors(workdir: Path, args: list[str], says: str) -> None:
    (workdir / "e.csv").write_text("departmentUUID,customerUUID,sourceUuid\nd,c,s\n")
    result = runner.invoke(app, ["validate", "e.csv", *args])
    assert result.exit_code == 2 and says in result.output


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ("{ column = 5 }", "column must be text"),
        ('{ column = "a", tz = 5 }', "tz must be text"),
        ('{ column = "a", strip = "yes" }', "strip must be true or false"),
        ('{ column = "a", tz = "Mars/Olympus" }', "unknown time zone"),
        ('{ column = "a", frobnicate = true }', "unknown key"),
    ],
)
def test_odd_mapping_values_are_usage_errors(workdir: Path, rule: str, says: str) -> None:
    (workdir / "e.csv").write_text("a\nx\n")
    (workdir / "m.toml").write_text(f"[fields]\nsourceUuid = {rule}\n")
    result = runner.invoke(app, ["validate", "e.csv", "--map", "m.toml"])
    assert result.exit_code == 2 and says in result.output, result.output


def test_templates_reach_into_json_records(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text('{"cust": {"id": 7}, "dep": "d", "text": "hi", "n": 1}\n')
    (tmp_path / "m.toml").write_text(
        '[fields]\ndepartmentUUID = "dep"\ncustomerUUID = { template = "c-{cust.id}" }\n'
        'sourceUuid = { template = "{dep}-{n}-{missing}" }\n"messageAttributes.body" = "text"\n'
    )
    result = histimport.validate(
        [path], Config(map_file=tmp_path / "m.toml", failed_out=tmp_path / "f.json")
    )
    assert result.exit_status is ExitStatus.OK
    assert result.plan[0]["customerUUID"] == "c-7"


def test_numbers_beyond_64_bits_are_rejected_not_altered(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(
        '{"departmentUUID":"d","customerUUID":"c","sourceUuid":"s1",'
        '"messageAttributes":{"body":"x","metaData":{"n":99999999999999999999}}}\n'
        '{"departmentUUID":"d","customerUUID":"c","sourceUuid":"s2",'
        '"messageAttributes":{"body":"call 12345678901234567890, ok"}}\n'
    )
    result = histimport.validate([path], Config(failed_out=tmp_path / "f.json"))
    (failure,) = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    assert (failure["line"], failure["errors"][0]["errorCode"]) == (1, "NUMBER_TOO_LARGE")
    assert result.counts["read"] == 2


class _Reading(Silent):
    """An observer that keeps what it is told about reading."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.calls: list[tuple[str, int, int | None]] = []

    def staging(self, source: str) -> None:
        self.sources.append(source)

    def reading(self, done: int, total: int | None) -> None:
        self.calls.append((self.sources[-1], done, total))


def test_reading_progress_counts_the_bytes_of_each_source(tmp_path: Path) -> None:
    """What a progress bar shows while staging: bytes read of the file's size, never going
    back, ending at the whole file; for gzip, compressed bytes of the compressed size."""
    plain = write_jsonl(tmp_path / "a.jsonl", interleaved(50, 200))
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    observer = _Reading()
    result = histimport.validate(
        [plain, packed],
        Config(check_workers=0, failed_out=tmp_path / "failed.json"),
        observer=observer,
    )
    assert result.counts["read"] == 20_000
    for path in (plain, packed):
        calls = [(done, total) for source, done, total in observer.calls if source == str(path)]
        size = path.stat().st_size
        assert len(calls) >= 3, calls  # one per 4,096 rows, and the last
        assert all(total == size for _, total in calls)
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)
        assert calls[-1] == (size, size)
    assert observer.calls[0][1] < plain.stat().st_size  # reported while reading, not after


def test_a_terminal_sees_the_reading_bar(tmp_path: Path) -> None:
    from rich.console import Console

    from histimport.display import Display

    source = write_jsonl(tmp_path / "export.jsonl", interleaved(20, 300))
    display = Display(quiet=False, log_format="text")
    screen = io.StringIO()
    display.console = Console(file=screen, force_terminal=True, width=160)
    display.animate = True
    config = Config(check_workers=0, failed_out=tmp_path / "failed.json")
    result = histimport.validate([source], config, observer=display)
    display.summary(result, title="validate")
    shown = screen.getvalue()
    assert f"reading {source}" in shown
    size = source.stat().st_size / 1e6
    assert f"{size:.1f}/{size:.1f} MB" in shown


def failures_of(tmp_path: Path, *sources: Path, **options: Any) -> list[tuple[int, str]]:
    histimport.validate(list(sources), Config(failed_out=tmp_path / "f.json", **options))
    failures = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    return [(f["line"], f["errors"][0]["errorCode"]) for f in failures]


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1", "utf-16"])
def test_a_csv_line_too_long_inside_a_quoted_cell_loses_nothing_after_it(
    tmp_path: Path, encoding: str
) -> None:
    """Its stand-in opens or closes the quoted cell as the line did, and the limit holds
    whatever the encoding (in characters for another than UTF-8)."""
    lines = [
        "departmentUUID,customerUUID,sourceUuid,messageAttributes.body",
        'd,c,s1,"a cell',
        "x" * 2000 + ' with a "" quote inside',
        "z" * 2000 + ' that ends here"',
        "d,c,s2," + "y" * 2000 + ' and a 27" monitor, unquoted',  # that quote is a character
        *(f"d,c,s{n},fine" for n in range(3, 53)),
    ]
    path = tmp_path / "e.csv"
    path.write_bytes("\r\n".join(lines).encode(encoding) + b"\r\n")
    result = histimport.validate(
        [path],
        Config(failed_out=tmp_path / "f.json", max_line_bytes=1024, encoding=encoding),
    )
    failures = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    assert [(f["line"], f["errors"][0]["errorCode"]) for f in failures] == [
        (2, "LINE_TOO_LONG"),
        (5, "LINE_TOO_LONG"),
    ]
    assert result.counts["read"] == 52


def test_a_csv_line_with_exactly_the_limit_before_its_line_end_is_not_too_long(
    tmp_path: Path,
) -> None:
    head = "departmentUUID,customerUUID,sourceUuid,messageAttributes.body"
    row = "d,c,s1,"
    row += "z" * (1024 - len(row))
    for encoding in ("utf-8", "latin-1"):
        path = tmp_path / f"{encoding}.csv"
        path.write_bytes(f"{head}\r\n{row}\r\nd,c,s2,{'z' * 1030}\r\nd,c,s3,x\r\n".encode())
        assert failures_of(tmp_path, path, max_line_bytes=1024, encoding=encoding) == [
            (3, "LINE_TOO_LONG")
        ], encoding


# 1,025 characters: one more than the limit; the other ends where a piece of the rest,
# skipped 1 MiB at a time, ends, so that "\r\n" is split between two pieces.
@pytest.mark.parametrize("length", [1025, 1026 + (1 << 20) - 1], ids=["limit+1", "far"])
@pytest.mark.parametrize("ending", ["\r", "\r\n"], ids=["CR", "CRLF"])
@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_long_csv_line_of_another_encoding_ends_where_its_line_end_is(
    tmp_path: Path, encoding: str, ending: str, length: int
) -> None:
    """Read to a limit, such a line ends on its carriage return: the record after it is read
    as it is (not skipped as the rest of the long line), and counted from its own line."""
    long_row = "d,c,s1," + "z" * (length - 11) + ",SMS"
    assert len(long_row) == length
    lines = [
        "departmentUUID,customerUUID,sourceUuid,messageAttributes.body,messageAttributes.protocol",
        long_row,
        "d,c,s2,kept,SMS",
        "d,c,,no sourceUuid,SMS",
        "d,c,s4,kept too,SMS",
    ]
    path = tmp_path / "e.csv"
    path.write_bytes(ending.join(lines).encode(encoding) + ending.encode(encoding))
    failed = failures_of(tmp_path, path, max_line_bytes=1024, encoding=encoding)
    assert failed == [(2, "LINE_TOO_LONG"), (4, "MISSING_FIELD")]


@pytest.mark.parametrize("damage", ["cut short", "corrupt", "trailing garbage"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_damaged_gzip_source_keeps_what_could_be_read(
    tmp_path: Path, damage: str, fmt: str
) -> None:
    if fmt == "jsonl":
        text = b"".join(orjson.dumps(message("d", "c", n)) + b"\n" for n in range(2000))
    else:
        text = b"departmentUUID,customerUUID,sourceUuid,messageAttributes.body\n" + b"".join(
            b"d,c,s%d,body %d\n" % (n, n) for n in range(2000)
        )
    packed = gzip.compress(text)
    data = {
        "cut short": packed[: len(packed) // 2],
        "corrupt": packed[: len(packed) // 2] + b"\x00" * 64 + packed[len(packed) // 2 :],
        "trailing garbage": packed + b"not gzip",
    }[damage]
    path = tmp_path / f"e.{fmt}.gz"
    path.write_bytes(data)
    result = histimport.validate([path], Config(failed_out=tmp_path / "f.json"))
    codes = [
        f["errors"][0]["errorCode"]
        for f in orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    ]
    if damage == "corrupt":
        # What deflate made of the damage before it noticed is rejected row by row.
        assert codes[-1] == "UNREADABLE"
    else:
        assert codes == ["UNREADABLE"]
    assert result.counts["read"] - result.counts["rejected"] > 500  # the rows before it


def test_a_utf8_csv_of_lone_carriage_returns_longer_than_a_line_is_told_so(
    tmp_path: Path,
) -> None:
    lines = ["departmentUUID,customerUUID,sourceUuid,messageAttributes.body"]
    lines += [f"d,c,s{n},body {n}" for n in range(200)]
    path = tmp_path / "e.csv"
    path.write_bytes("\r".join(lines).encode() + b"\r")
    with pytest.raises(SourceError, match=r"line 1: .* end in a lone carriage return") as told:
        histimport.validate([path], Config(failed_out=tmp_path / "f.json", max_line_bytes=1024))
    assert "tr '\\r' '\\n'" in (told.value.hint or "")
    # Named as another encoding, it is read as text, where a lone carriage return ends a line.
    latin = histimport.validate(
        [path], Config(failed_out=tmp_path / "f.json", max_line_bytes=1024, encoding="latin-1")
    )
    assert latin.counts["read"] == 200 and latin.counts["rejected"] == 0


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_quoted_cell_over_the_csv_limit_rejects_its_record_alone(
    tmp_path: Path, encoding: str
) -> None:
    """The cell spans many lines, each under --max-line-bytes: the records after it are
    read as they are, from their own lines."""
    head = (
        "departmentUUID,customerUUID,sourceUuid,messageAttributes.body,messageAttributes.protocol"
    )
    cell = ("y" * 99 + "\n") * 1500  # 150,000 characters over 1,500 lines
    text = f'{head}\nd,c,s1,"{cell}",SMS\nd,c,s2,kept,SMS\nd,c,,no id,SMS\nd,c,s4,"open'
    path = tmp_path / "e.csv"
    path.write_bytes(text.encode(encoding))
    result = histimport.validate(
        [path], Config(failed_out=tmp_path / "f.json", max_line_bytes=1024, encoding=encoding)
    )
    failures = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    assert [(f["line"], f["errors"][0]["errorCode"]) for f in failures] == [
        (2, "INVALID_CSV"),
        (1504, "MISSING_FIELD"),
        (1505, "INVALID_CSV"),  # a cell left open at the end of the file
    ]
    assert "a quoted cell is longer than" in failures[0]["errors"][0]["errorDescription"]
    assert result.counts["read"] == 4


@pytest.mark.parametrize(("encoding", "says"), [("utf-16", "BOM"), ("idna", "error handling")])
def test_an_encoding_that_cannot_read_the_file_is_a_usage_error(
    workdir: Path, encoding: str, says: str
) -> None:
    text = "departmentUUID,customerUUID,sourceUuid,messageAttributes.body\nd,c,s1,hi\n"
    (workdir / "e.csv").write_bytes(text.encode("utf-16-le"))  # no byte-order mark
    result = runner.invoke(app, ["validate", "e.csv", "--encoding", encoding])
    assert result.exit_code == 2, result.output
    assert "e.csv: cannot be read" in result.output and says in result.output
    assert "check --encoding" in result.output
    assert "Traceback" not in result.output


def test_a_source_broken_off_inside_a_cell_over_the_csv_limit_keeps_what_was_read(
    tmp_path: Path,
) -> None:
    head = (
        "departmentUUID,customerUUID,sourceUuid,messageAttributes.body,messageAttributes.protocol"
    )
    text = f'{head}\nd,c,s1,ok,SMS\nd,c,s2,"' + ("y" * 99 + "\n") * 3000 + 'end",SMS\n'
    path = tmp_path / "e.csv.gz"
    path.write_bytes(gzip.compress(text.encode())[:-200])
    histimport.validate([path], Config(failed_out=tmp_path / "f.json", max_line_bytes=1024))
    failures = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    assert [f["errors"][0]["errorCode"] for f in failures] == ["INVALID_CSV", "UNREADABLE"]
    assert failures[0]["line"] == 3


def test_a_cell_over_the_csv_limit_on_its_first_line_is_skipped_whole(tmp_path: Path) -> None:
    """A CRLF line whose cell fills the limit: its line end goes into the cell too."""
    head = "departmentUUID,customerUUID,sourceUuid,messageAttributes.body"
    cell = '"' + "y" * 131071
    text = f'{head}\r\n{cell}\r\nmore",c,s1,x\r\nd,c,s2,kept\r\n'
    path = tmp_path / "e.csv"
    path.write_bytes(text.encode())
    result = histimport.validate(
        [path], Config(failed_out=tmp_path / "f.json", max_line_bytes=131072)
    )
    failures = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    assert [(f["line"], f["errors"][0]["errorCode"]) for f in failures] == [(2, "INVALID_CSV")]
    assert result.counts["read"] == 2


def test_a_stray_carriage_return_rejects_its_record_in_plain_words(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(
        b"departmentUUID,customerUUID,sourceUuid,messageAttributes.body\n"
        b'd,c,s1,one\rtwo\nd,c,s2,"one\rtwo"\n'
    )
    histimport.validate([path], Config(failed_out=tmp_path / "f.json"))
    (failure,) = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    assert failure["line"] == 2
    assert failure["errors"] == [
        {
            "errorCode": "INVALID_CSV",
            "errorDescription": "record is not valid CSV: a carriage return (\\r) that does "
            "not end a line stands outside quotes",
        }
    ]


def test_a_csv_of_another_encoding_ending_inside_a_quote(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    text = 'departmentUUID,customerUUID,sourceUuid,messageAttributes.body\nd,c,s1,ok\nd,c,s2,"open'
    path.write_bytes(text.encode("latin-1"))
    assert failures_of(tmp_path, path, encoding="latin-1") == [(3, "INVALID_CSV")]
    (tmp_path / "empty.csv").write_bytes(b"")
    assert failures_of(tmp_path, tmp_path / "empty.csv", encoding="cp1252") == []


def test_odd_rows_are_rejected_not_raised(tmp_path: Path) -> None:
    deep = b'{"departmentUUID":"d","customerUUID":"c","sourceUuid":"x","metaData":'
    deep += b'{"a":' * 990 + b"1234567890123456789" + b"}" * 990 + b"}"
    rows = [
        deep,
        orjson.dumps(message("d", "c", 2, sentOn="0001-01-01T00:30:00+01:00")),
        orjson.dumps(message("d", "c", 3, sentOn="9999-12-31T23:30:00-01:00")),
        orjson.dumps(message("d", "c", 4)),
    ]
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    assert failures_of(tmp_path, path, check_workers=0) == [
        (1, "TOO_DEEP"),
        (2, "INVALID_TIMESTAMP"),
        (3, "INVALID_TIMESTAMP"),
    ]


@pytest.mark.parametrize(
    ("header", "mapping", "says"),
    [
        ("messageAttributes,messageAttributes.body", None, "overlap"),
        ("messageAttributes.metaData.ref,messageAttributes.metaData", None, "overlap"),
        (
            "a,b",
            '[fields]\nvoiceCallAttributes = "a"\n"voiceCallAttributes.callStatus" = "b"\n',
            "overlap",
        ),
        ("id,text", '[fields]\nsourceUuid = "id"\n"messageAttributes.body" = "txet"\n', "'txet'"),
        ("id,text", '[fields]\nsourceUuid = "id"\nsentOn = { template = "{day}" }\n', "'day'"),
        # A format spec is the mapping's: no width from the data, none too large to render.
        ("id,w", '[fields]\nsourceUuid = { template = "{id:>{w}}" }\n', "may not hold a field"),
        ("id", '[fields]\nsourceUuid = { template = "{id:>99999999999}" }\n', "over 1000"),
        ("id", '[fields]\nsourceUuid = { template = "{id:.5000}" }\n', "over 1000"),
    ],
)
def test_columns_that_would_lose_values_are_usage_errors(
    workdir: Path, header: str, mapping: str | None, says: str
) -> None:
    """Two columns filling one field, a rule reading a column the header lacks (a typo
    would leave a field empty in every row) or a template that could not be rendered: the
    run stops before anything is read."""
    (workdir / "e.csv").write_text(f"{header}\nx,y\n")
    args = ["validate", "e.csv"]
    if mapping is not None:
        (workdir / "m.toml").write_text(mapping)
        args += ["--map", "m.toml"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and says in result.output, result.output


def test_a_rule_with_a_default_may_read_a_column_an_export_lacks(workdir: Path) -> None:
    (workdir / "e.csv").write_text("d,c,id\nd1,c1,s1\n")
    (workdir / "m.toml").write_text(
        "[fields]\n"
        'departmentUUID = "d"\ncustomerUUID = "c"\nsourceUuid = "id"\n'
        'sentOn = { const = "2024-01-01T00:00:00Z" }\n'
        '"messageAttributes.body" = { column = "text", default = "(no text)" }\n'
    )
    result = runner.invoke(app, ["validate", "e.csv", "--map", "m.toml"])
    assert result.exit_code == 0, result.output


def test_a_repeated_source_uuid_names_where_it_was_first_read(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [message("d", "c", n) for n in range(3)])
    second = write_jsonl(tmp_path / "b.jsonl", [message("d", "c", n) for n in (7, 1, 7)])
    histimport.validate([first, second], Config(failed_out=tmp_path / "f.json"))
    failures = orjson.loads((tmp_path / "f.json").read_bytes())["failures"]
    reasons = {f["line"]: f["errors"][0]["errorDescription"] for f in failures}
    uuid_1, uuid_7 = message("d", "c", 1)["sourceUuid"], message("d", "c", 7)["sourceUuid"]
    assert reasons == {
        2: f'sourceUuid: "{uuid_1}" was already read at {first}:2',
        3: f'sourceUuid: "{uuid_7}" was already read at line 1',
    }


def test_a_csv_json_cell_with_an_integer_beyond_64_bits_is_rejected_not_altered(
    tmp_path: Path,
) -> None:
    path = tmp_path / "e.csv"
    path.write_text(
        "departmentUUID,customerUUID,sourceUuid,messageAttributes.body,messageAttributes.metaData\n"
        'd,c,s1,hi,"{""orderId"": 123456789012345678901}"\n'
        'd,c,s2,hi,"{""orderId"": 12345678901234567890}"\n'
    )
    assert failures_of(tmp_path, path) == [(2, "NUMBER_TOO_LARGE")]


def test_a_default_goes_through_the_rest_of_its_rule_and_booleans_map(tmp_path: Path) -> None:
    """The transforms apply in the order README.md gives: a default is then mapped, read as
    a time stamp and typed like any value; a JSON true is found as `true` in a map."""
    source = write_jsonl(
        tmp_path / "e.jsonl",
        [{"d": "d1", "c": "c1", "id": "s1", "dir": None, "at": None, "vip": True}],
    )
    (tmp_path / "m.toml").write_text(
        "[fields]\n"
        'departmentUUID = "d"\ncustomerUUID = "c"\nsourceUuid = "id"\n'
        '"messageAttributes.body" = { column = "vip", map = { true = "VIP customer" } }\n'
        '"messageAttributes.type" = { column = "dir", default = "in", map = { in = "INBOUND" } }\n'
        'sentOn = { column = "at", default = "01/02/2024 10:00", timestamp = "%d/%m/%Y %H:%M", '
        'tz = "UTC" }\n'
    )
    outcome = histimport.validate(
        [source], Config(map_file=tmp_path / "m.toml", failed_out=tmp_path / "f.json")
    )
    assert outcome.exit_status is ExitStatus.OK, (tmp_path / "f.json").read_text()
    from histimport.mapping import Mapper, Mapping
    from histimport.read import RawRow

    mapper = Mapper("jsonl", Mapping.load(tmp_path / "m.toml"), "e", generate_source_uuid=False)
    row = mapper(RawRow(0, 1, orjson.loads(source.read_bytes())))
    assert row is not None and row.data is not None
    assert row.data["messageAttributes"] == {"body": "VIP customer", "type": "INBOUND"}
    assert row.data["sentOn"] == "2024-02-01T10:00:00.000Z"


def test_a_pipe_is_read_and_a_directory_is_named(tmp_path: Path) -> None:
    """`histimport load <(zcat export.jsonl.gz)` hands over a pipe, not a regular file."""
    import threading

    pipe = tmp_path / "export.pipe"
    os.mkfifo(pipe)
    data = b"".join(orjson.dumps(message("d", "c", n)) + b"\n" for n in range(50))

    def write() -> None:
        with open(pipe, "wb") as out:
            out.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    result = histimport.validate(
        [pipe], Config(format="jsonl", failed_out=tmp_path / "f.json", check_workers=0)
    )
    writer.join()
    assert result.exit_status is ExitStatus.OK and result.counts["read"] == 50
    outcome = runner.invoke(app, ["validate", str(tmp_path), "--format", "jsonl"])
    assert outcome.exit_code == 2 and "is a directory" in outcome.output
