"""Real HTTP over loopback into the sandbox: the whole path, and the contract on the wire."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openapi_schema_validator import OAS30Validator

import histimport
from histimport import ExitStatus
from histimport.check import normalise_timestamp
from histimport.models import NOTIFIER_FLAGS
from histimport.sandbox import RunningSandbox, SandboxConfig, sandbox

from .conftest import config_for, contract_schema
from .factory import interleaved, message, write_jsonl


def stored_order(server: RunningSandbox) -> dict[str, list[str]]:
    by_customer: dict[str, list[str]] = defaultdict(list)
    for stored in server.store.messages():
        by_customer[stored.customer].append(stored.source_uuid)
    return by_customer


def assert_invariant(report: dict[str, Any]) -> None:
    parts = ("rejected", "accepted", "failed", "notSent", "alreadyAccepted")
    assert report["read"] == sum(report[k] for k in parts)


def test_20000_interleaved_messages_are_stored_once_in_order(
    server: RunningSandbox, tmp_path: Path
) -> None:
    rows = list(interleaved(customers=300, per_customer=67))[:20_000]
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    result = histimport.load([source], config_for(server, tmp_path))
    assert result.exit_status is ExitStatus.OK
    assert server.store.count() == 20_000
    assert server.store.duplicate_receipts() == 0
    expected: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        expected[row["customerUUID"]].append(row["sourceUuid"])
    assert stored_order(server) == expected
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert_invariant(report)
    assert (report["read"], report["accepted"], report["format"]) == (
        20_000,
        20_000,
        "histimport.report/v1",
    )
    failed = orjson.loads((tmp_path / "failed.json").read_bytes())
    assert failed["failures"] == [] and failed["format"] == "histimport.failed/v1"
    # The state dir keeps ids, not the messages: nothing of their bodies is left in it.
    state = tmp_path / "state"
    assert sorted(f.name for f in state.iterdir()) == ["ledger.sqlite3", "lock"]
    needle = rows[17]["messageAttributes"]["body"].encode()
    assert all(needle not in f.read_bytes() for f in state.iterdir() if f.is_file())
    assert sum(f.stat().st_size for f in state.iterdir()) <= 200 * 20_000
    # A second run with the same state dir sends nothing.
    again = histimport.load([source], config_for(server, tmp_path))
    assert again.exit_status is ExitStatus.OK
    assert (again.report["requests"], again.report["alreadyAccepted"]) == (0, 20_000)
    assert server.store.receipt_count() == 20_000


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[RunningSandbox]:
    config = SandboxConfig(
        port=0, db=tmp_path / "sandbox.sqlite3", fail_rate=0.3, reject_rate=0.03, seed=7
    )
    with sandbox(config) as running:
        yield running


def test_faults_then_retry_stores_exactly_the_retryable(
    faulty: RunningSandbox, tmp_path: Path
) -> None:
    rows = list(interleaved(customers=40, per_customer=30))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    result = histimport.load([source], config_for(faulty, tmp_path, chunk_size=10, max_attempts=1))
    assert result.exit_status is ExitStatus.INCOMPLETE

    everything = {r["sourceUuid"] for r in rows}
    stored = {m.source_uuid for m in faulty.store.messages()}
    failed = orjson.loads((tmp_path / "failed.json").read_bytes())
    listed = {f["sourceUuid"]: f for f in failed["failures"]}
    assert set(listed) == everything - stored
    unavailable = {u for u, f in listed.items() if f["httpStatus"] == 503}
    refused = {u for u, f in listed.items() if f["httpStatus"] == 200}
    held = {u for u, f in listed.items() if f["stage"] == "notSent"}
    assert unavailable and refused and held
    assert unavailable | refused | held == set(listed)
    assert all(listed[u]["retryable"] and listed[u]["stage"] == "failed" for u in unavailable)
    assert not any(listed[u]["retryable"] for u in refused)
    assert {listed[u]["errors"][0]["errorCode"] for u in refused} == {"REJECTED"}
    assert {listed[u]["errors"][0]["errorCode"] for u in held} == {"HELD_BACK"}
    assert all(listed[u]["retryable"] for u in held)
    lines = {r["sourceUuid"]: n + 1 for n, r in enumerate(rows)}
    assert all(f["line"] == lines[u] for u, f in listed.items())
    report = result.report
    assert_invariant(report)
    assert report["failed"] + report["notSent"] == len(listed)
    assert (report["failed"], report["notSent"]) == (
        failed["counts"]["failed"],
        failed["counts"]["notSent"],
    )
    assert report["accepted"] == len(stored)
    assert report["statusCodes"]["503"] > 0
    receipts_before = faulty.store.receipt_count()
    faulty.stop()

    with sandbox(SandboxConfig(port=0, db=tmp_path / "sandbox.sqlite3")) as healed:
        again = histimport.retry([tmp_path / "failed.json"], config_for(healed, tmp_path))
        # Everything re-sent was accepted; the refusals, not re-sent, are listed again.
        assert again.exit_status is ExitStatus.INCOMPLETE
        assert again.message is not None and f"lists again {len(refused)} entries" in again.message
        relisted = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
        assert {f["sourceUuid"] for f in relisted} == refused
        stored_now = {m.source_uuid for m in healed.store.messages()}
        assert stored_now == stored | unavailable | held
        assert healed.store.duplicate_receipts() == 0
        assert healed.store.receipt_count() == receipts_before + len(unavailable | held)
        # A customer's messages after one that failed were held back, so even across the
        # two runs every customer's history is stored in file order.
        by_customer: dict[str, list[str]] = defaultdict(list)
        for m in healed.store.messages():
            by_customer[m.customer].append(m.source_uuid)
        assert all(order == sorted(order) for order in by_customer.values())
        assert again.report["read"] == len(unavailable | held)


def test_the_wire_follows_the_contract(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    rows = [
        message("dep-a", "c-1", 1, userUuid="agent-7"),
        message(
            "dep-a",
            "c-1",
            2,
            sentOn="2025-03-30T03:30:00.5+02:00",
            receivedOn="2025-03-30T01:30:01Z",
            notificationAttributes={"threadOwnerNotifierPop": True, "sendPhoneNotification": True},
            voiceCallAttributes={"callStatus": 2, "callDateTime": "2025-03-30T03:00:00+02:00"},
        ),
        message(
            "dep-b",
            "c-2",
            3,
            messageAttributes={
                "body": "see attachment",
                "tags": ["TRASH"],
                "metaData": {"k": [1, {"x": None}]},
                "attachments": [
                    {"fileURL": "https://f.example/a.pdf", "mimeType": "application/pdf"}
                ],
                "draftAttributes": {"draftStatus": "SCHEDULED", "scheduledOn": "tomorrow"},
            },
        ),
    ]
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, journal=journal)) as server:
        result = histimport.load(
            [source], config_for(server, tmp_path, callback_url="https://cb.example/hook")
        )
        stored = {m.source_uuid: m.body for m in server.store.messages()}
        answer = httpx.put(
            f"{server.base_url}/department/dep-z/customer/c-9/communication/historical",
            json={"saveMessageRequestList": [{"sourceUuid": "z-1"}, {}]},
            auth=("a", "b"),
        )
    assert result.exit_status is ExitStatus.OK

    request_schema = OAS30Validator(contract_schema("SaveMessageRequestBody"))
    requests = [orjson.loads(line) for line in journal.read_bytes().splitlines()][:-1]
    # The first message alone (checking the platform), then one request per customer.
    assert len(requests) == 3
    assert len(orjson.loads(requests[0]["body"])["saveMessageRequestList"]) == 1
    for request in requests:
        body = orjson.loads(request["body"])
        request_schema.validate(body)
        assert body["callBackPathUrl"] == "https://cb.example/hook"
        assert request["headers"]["content-type"] == "application/json"
        assert request["path"].endswith("/communication/historical")

    for row in rows:
        expected = {k: v for k, v in row.items() if k not in ("departmentUUID", "customerUUID")}
        for field in ("sentOn", "receivedOn"):
            if field in expected:
                expected[field] = normalise_timestamp(expected[field])
        if "voiceCallAttributes" in expected:
            call = expected["voiceCallAttributes"]
            call["callDateTime"] = normalise_timestamp(call["callDateTime"])
        notes = dict(expected.get("notificationAttributes", {}))
        notes.update(dict.fromkeys(NOTIFIER_FLAGS, False))
        expected["notificationAttributes"] = notes
        assert stored[row["sourceUuid"]] == expected
    assert stored[rows[1]["sourceUuid"]]["sentOn"] == "2025-03-30T01:30:00.500Z"

    OAS30Validator(contract_schema("SaveMessageResponseBody")).validate(answer.json())
    assert answer.json()["failedSourceUuids"] == []


def test_no_notifier_flag_is_true_without_notify(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    loud = {flag: True for flag in NOTIFIER_FLAGS}
    rows = [message("d", f"c{n % 3}", n, notificationAttributes=dict(loud)) for n in range(30)]
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, journal=journal)) as server:
        histimport.load([source], config_for(server, tmp_path))
        quiet = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
        journal.unlink()
        histimport.load([source], config_for(server, tmp_path / "other", notify=True))
        noisy = [orjson.loads(line) for line in journal.read_bytes().splitlines()]

    def flags(requests: list[dict[str, Any]]) -> set[bool]:
        return {
            m["notificationAttributes"][flag]
            for r in requests
            for m in orjson.loads(r["body"])["saveMessageRequestList"]
            for flag in NOTIFIER_FLAGS
        }

    # The first message alone, then one request per customer.
    assert len(quiet) == 4 and flags(quiet) == {False}
    assert len(noisy) == 4 and flags(noisy) == {True}


def test_an_unknown_department_fails_alone(tmp_path: Path) -> None:
    rows = list(interleaved(customers=30, per_customer=5, departments=3))
    source = write_jsonl(tmp_path / "export.jsonl", rows)
    with sandbox(SandboxConfig(port=0, departments=frozenset({"dep-0", "dep-1"}))) as server:
        result = histimport.load([source], config_for(server, tmp_path))
        stored = {m.source_uuid for m in server.store.messages()}
    assert result.exit_status is ExitStatus.INCOMPLETE
    unknown = {r["sourceUuid"] for r in rows if r["departmentUUID"] == "dep-2"}
    assert stored == {r["sourceUuid"] for r in rows} - unknown
    failures = orjson.loads((tmp_path / "failed.json").read_bytes())["failures"]
    assert {f["sourceUuid"] for f in failures} == unknown
    assert {(f["httpStatus"], f["retryable"], f["errors"][0]["errorCode"]) for f in failures} == {
        (404, False, "DEPARTMENT_NOT_FOUND")
    }
    assert result.report["retries"] == 0
