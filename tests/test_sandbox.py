"""The bundled sandbox, over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS30Validator, validate

import histimport.sandbox
from histimport.errors import UsageError
from histimport.sandbox import (
    RunningSandbox,
    SandboxConfig,
    SandboxError,
    SandboxStore,
    sandbox,
    start_sandbox,
)
from histimport.sandbox.limits import FixedWindow, TokenBucket
from histimport.sandbox.store import new_uuid, new_uuids

from .conftest import contract_schema


@pytest.fixture(scope="module")
def answer_schema() -> dict[str, Any]:
    """SaveMessageResponseBody from the contract."""
    return contract_schema("SaveMessageResponseBody")


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as http:
        yield http


@pytest.fixture(scope="module")
def shared() -> Iterator[RunningSandbox]:
    """One fault-free sandbox; its users keep to their own department and sourceUuids."""
    with sandbox(SandboxConfig(port=0)) as running:
        yield running


@pytest.fixture
def department() -> str:
    return f"dep-{uuid.uuid4()}"


def endpoint(running: RunningSandbox, department: str = "dep-1", customer: str = "cust-1") -> str:
    return (
        f"{running.base_url}/department/{department}/customer/{customer}/communication/historical"
    )


def put(
    client: httpx.Client,
    running: RunningSandbox,
    messages: list[Any],
    department: str = "dep-1",
    customer: str = "cust-1",
    **kwargs: Any,
) -> httpx.Response:
    return client.put(
        endpoint(running, department, customer), json={"saveMessageRequestList": messages}, **kwargs
    )


def msg(source_uuid: str, body: str = "hello") -> dict[str, Any]:
    return {"sourceUuid": source_uuid, "messageAttributes": {"body": body, "type": "TEXT"}}


def stats(client: httpx.Client, running: RunningSandbox) -> dict[str, Any]:
    response = client.get(f"{running.root_url}/_sandbox/stats")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def assert_uuid4(value: str) -> None:
    assert uuid.UUID(value).version == 4


def test_message_ids_are_random_version_4_uuids() -> None:
    made = [*new_uuids(500), new_uuid()]
    assert len(set(made)) == len(made)
    for value in made:
        assert_uuid4(value)
        assert str(uuid.UUID(value)) == value  # lower case, the usual groups


# --- storing and the answer's shape -------------------------------------------------------


def test_stores_messages_and_answers_in_the_documented_shape(
    client: httpx.Client, shared: RunningSandbox, department: str, answer_schema: dict[str, Any]
) -> None:
    sent = [
        {
            "sourceUuid": "s-1",
            "sentOn": "2025-03-28T11:34:43.227Z",
            "messageAttributes": {"body": "Grüße, 👋", "tags": ["TRASH"], "metaData": {"n": 1.5}},
            "voiceCallAttributes": {"callStatus": 2},
        },
        msg("s-2"),
    ]
    response = put(client, shared, sent, department)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    validate(answer, answer_schema, cls=OAS30Validator, enforce_properties_required=True)
    assert set(answer) == {
        "saveMessageResponse",
        "succesfullySubmittedSourceUuids",
        "failedSourceUuids",
        "errors",
        "warnings",
    }
    assert answer["succesfullySubmittedSourceUuids"] == ["s-1", "s-2"]
    assert answer["failedSourceUuids"] == answer["errors"] == answer["warnings"] == []
    entries = answer["saveMessageResponse"]
    assert [e["sourceUuid"] for e in entries] == ["s-1", "s-2"]
    for entry in entries:
        assert_uuid4(entry["messageUuid"])
        assert entry["errors"] == entry["warnings"] == []

    stored = shared.store.messages(department=department)
    assert [m.source_uuid for m in stored] == ["s-1", "s-2"]
    assert [m.message_uuid for m in stored] == [e["messageUuid"] for e in entries]
    assert [m.body for m in stored] == sent
    assert list(stored[0].body) == list(sent[0])  # key order kept as received
    assert {(m.department, m.customer) for m in stored} == {(department, "cust-1")}


def test_schema_check_is_real(answer_schema: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        validate({"saveMessageResponse": [{"errors": "no"}]}, answer_schema, cls=OAS30Validator)


def test_admin_messages_lists_in_stored_order_and_filters(
    client: httpx.Client, shared: RunningSandbox, department: str
) -> None:
    assert put(client, shared, [msg("a-1"), msg("a-2")], department, "c-a").status_code == 200
    assert put(client, shared, [msg("b-1")], department, "c-b").status_code == 200
    assert put(client, shared, [msg("a-3")], department, "c-a").status_code == 200

    url = f"{shared.root_url}/_sandbox/messages"
    listed = client.get(url, params={"department": department, "customer": "c-a"}).json()
    assert [m["sourceUuid"] for m in listed] == ["a-1", "a-2", "a-3"]
    assert set(listed[0]) == {"department", "customer", "sourceUuid", "messageUuid", "body"}
    assert listed[0]["body"] == msg("a-1")
    everything = client.get(url, params={"department": department}).json()
    assert [m["sourceUuid"] for m in everything] == ["a-1", "a-2", "b-1", "a-3"]
    assert len(client.get(url).json()) >= 4


def test_an_integer_beyond_64_bits_is_stored_whole(
    client: httpx.Client, shared: RunningSandbox, department: str
) -> None:
    content = b'{"saveMessageRequestList": [{"sourceUuid": "big-1", "metaData": {"n": %d}}]}'
    response = client.put(
        endpoint(shared, department),
        content=content % 2**100,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    [stored] = shared.store.messages(department=department)
    assert stored.body["metaData"] == {"n": 2**100}


def test_answers_are_not_held_back(client: httpx.Client, shared: RunningSandbox) -> None:
    # Without TCP_NODELAY on the server's sockets each answer after the first waits ~40 ms.
    started = time.monotonic()
    for i in range(10):
        assert put(client, shared, [msg(f"fast-{i}")], f"fast-{uuid.uuid4()}").status_code == 200
    assert time.monotonic() - started < 0.3


def test_path_segments_are_percent_decoded(
    client: httpx.Client, shared: RunningSandbox, department: str
) -> None:
    response = put(client, shared, [msg("pct-1")], f"{department}%2Fx", "caf%C3%A9")
    assert response.status_code == 200
    [stored] = shared.store.messages(department=f"{department}/x")
    assert stored.customer == "café"


# --- idempotency and per-message errors -------------------------------------------------


def test_duplicates_are_not_stored_again_but_counted(client: httpx.Client) -> None:
    with sandbox(SandboxConfig(port=0)) as running:
        first = put(client, running, [msg("d-1"), msg("d-2")]).json()
        again = put(client, running, [msg("d-1"), msg("d-1"), msg("d-3")]).json()

        original = first["saveMessageResponse"][0]["messageUuid"]
        assert again["succesfullySubmittedSourceUuids"] == ["d-1", "d-1", "d-3"]
        assert again["failedSourceUuids"] == []
        dup1, dup2, new = again["saveMessageResponse"]
        for dup in (dup1, dup2):
            assert dup["messageUuid"] == original
            assert dup["errors"] == []
            assert [w["warningCode"] for w in dup["warnings"]] == ["DUPLICATE_SOURCE_UUID"]
        assert new["warnings"] == []

        assert [m.source_uuid for m in running.store.messages()] == ["d-1", "d-2", "d-3"]
        assert running.store.receipt_count() == 5
        assert running.store.duplicate_receipts() == 2
        assert stats(client, running) == {
            "stored": 3,
            "receipts": 5,
            "duplicates": 2,
            "requests": 2,
            "statuses": {"200": 2},
        }


def test_message_without_source_uuid_is_a_per_message_error(
    client: httpx.Client, shared: RunningSandbox, department: str, answer_schema: dict[str, Any]
) -> None:
    no_id = {"messageAttributes": {"body": "x"}}
    response = put(client, shared, [no_id, {"sourceUuid": 7}, "text", msg("ok-1")], department)

    assert response.status_code == 200
    answer = response.json()
    validate(answer, answer_schema, cls=OAS30Validator)
    assert answer["succesfullySubmittedSourceUuids"] == ["ok-1"]
    assert answer["failedSourceUuids"] == []
    codes = [[e["errorCode"] for e in entry["errors"]] for entry in answer["saveMessageResponse"]]
    assert codes == [["MISSING_SOURCE_UUID"], ["MISSING_SOURCE_UUID"], ["INVALID_MESSAGE"], []]
    assert "sourceUuid" not in answer["saveMessageResponse"][0]
    assert [m.source_uuid for m in shared.store.messages(department=department)] == ["ok-1"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "saveMessageRequestList"),
        (b'{"saveMessageRequestList": {}}', "saveMessageRequestList"),
        (b'{"saveMessageRequestList": [{"sourceUuid": "n", "x": NaN}]}', "NaN"),
        (b"\xff\xfe", "not valid JSON"),
        # No text holds a lone surrogate: the store could not keep it.
        (b'{"saveMessageRequestList": [{"sourceUuid": "\\ud800"}]}', "lone surrogate"),
        (
            b'{"saveMessageRequestList": [{"sourceUuid": "lone", "metaData": {"b": "\\udc00"}}]}',
            "lone surrogate",
        ),
        (b'{"saveMessageRequestList": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "not valid JSON"),
    ],
)
def test_malformed_body_is_400(
    client: httpx.Client, shared: RunningSandbox, content: bytes, problem: str
) -> None:
    response = client.put(
        endpoint(shared), content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert error["errorCode"] == "INVALID_REQUEST"
    assert problem in error["errorDescription"]


def test_other_content_type_is_415(client: httpx.Client, shared: RunningSandbox) -> None:
    response = client.put(
        endpoint(shared),
        content=b'{"saveMessageRequestList": []}',
        headers={"content-type": "text/plain"},
    )
    assert response.status_code == 415
    assert response.json()["errors"][0]["errorCode"] == "UNSUPPORTED_MEDIA_TYPE"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/communications/department/d/customer/c/communication/historical", 405),
        ("POST", "/communications/department/d/customer/c/communication/historical", 405),
        ("PUT", "/communications/department/d/customer/c/communication", 404),
        ("PUT", "/communications/department/d/customer/c/communication/historical/x", 404),
        ("PUT", "/communications/department//customer/c/communication/historical", 404),
        ("PUT", "/other/department/d/customer/c/communication/historical", 404),
        ("GET", "/", 404),
        ("GET", "/_sandbox/nothing", 404),
        ("POST", "/_sandbox/stats", 405),
    ],
)
def test_unknown_path_is_404_and_wrong_method_405(
    client: httpx.Client, shared: RunningSandbox, method: str, path: str, status: int
) -> None:
    response = client.request(method, shared.root_url + path, json={"saveMessageRequestList": []})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["errors"][0]["errorCode"] in ("NOT_FOUND", "METHOD_NOT_ALLOWED")
    if status == 405:
        assert response.headers["allow"] in ("PUT", "GET")


# --- authentication and limits ------------------------------------------------------------


def test_basic_auth_is_enforced_when_configured(client: httpx.Client) -> None:
    with sandbox(SandboxConfig(port=0, username="importer", password="s3cret")) as running:
        missing = put(client, running, [msg("au-1")])
        wrong = put(client, running, [msg("au-1")], auth=("importer", "guess"))
        right = put(client, running, [msg("au-1")], auth=("importer", "s3cret"))

        assert missing.status_code == wrong.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Basic")
        assert missing.json()["errors"][0]["errorCode"] == "UNAUTHORIZED"
        assert right.status_code == 200
        assert running.store.receipt_count() == 1
        assert stats(client, running)["statuses"] == {"200": 1, "401": 2}  # admin needs no auth


def test_any_credentials_are_accepted_when_none_configured(
    client: httpx.Client, shared: RunningSandbox, department: str
) -> None:
    assert put(client, shared, [msg("any-1")], department, auth=("x", "y")).status_code == 200
    assert put(client, shared, [msg("any-2")], department).status_code == 200


def test_body_over_max_request_bytes_is_413_and_not_stored(client: httpx.Client) -> None:
    with sandbox(SandboxConfig(port=0, max_request_bytes=300)) as running:
        small = put(client, running, [msg("m-1")])
        large = put(client, running, [msg(f"big-{i}", "x" * 50) for i in range(5)])

        assert small.status_code == 200
        assert large.status_code == 413
        assert large.json()["errors"][0]["errorCode"] == "PAYLOAD_TOO_LARGE"
        assert running.store.receipt_count() == 1
        assert [m.source_uuid for m in running.store.messages()] == ["m-1"]


def test_rate_limit_answers_429_with_retry_after(client: httpx.Client) -> None:
    with sandbox(SandboxConfig(port=0, rate_limit=0.5)) as running:
        first = put(client, running, [msg("r-1")])
        second = put(client, running, [msg("r-2")])

        assert first.status_code == 200
        assert second.status_code == 429
        assert second.json()["errors"][0]["errorCode"] == "RATE_LIMITED"
        assert 1 <= int(second.headers["retry-after"]) <= 2
        assert [m.source_uuid for m in running.store.messages()] == ["r-1"]
        assert stats(client, running)["statuses"] == {"200": 1, "429": 1}


def test_a_bare_429_when_told_not_to_say_when(client: httpx.Client) -> None:
    config = SandboxConfig(port=0, rate_limit=0.5, rate_retry_after=False)
    with sandbox(config) as running:
        put(client, running, [msg("b-1")])
        refused = put(client, running, [msg("b-2")])
        assert refused.status_code == 429 and "retry-after" not in refused.headers


def test_a_token_bucket_lets_its_burst_through_then_its_rate() -> None:
    bucket = TokenBucket(100.0, burst=10)
    at_once = [bucket.take(50.0) for _ in range(12)]
    assert at_once[:10] == [None] * 10 and at_once[10] == pytest.approx(0.01)
    assert bucket.take(50.011) is None  # one token back after 10 ms


def test_a_fixed_window_refuses_until_the_next_second_of_the_clock() -> None:
    window = FixedWindow(3.0)
    assert [window.take(7.2), window.take(7.5), window.take(7.6)] == [None] * 3
    assert window.take(7.75) == pytest.approx(0.25)
    assert window.take(7.99) is not None
    assert window.take(8.0) is None


def test_latency_delays_answers(client: httpx.Client) -> None:
    with sandbox(SandboxConfig(port=0, latency_ms=150)) as running:
        started = time.monotonic()
        assert put(client, running, [msg("l-1")]).status_code == 200
        assert time.monotonic() - started >= 0.15


# --- injected faults -------------------------------------------------------------------------


def test_fail_rate_answers_503_before_storing(client: httpx.Client) -> None:
    with sandbox(SandboxConfig(port=0, fail_rate=1.0, retry_after=0)) as running:
        response = put(client, running, [msg("f-1")])
        assert response.status_code == 503
        assert response.headers["retry-after"] == "0"
        assert response.json()["errors"][0]["errorCode"] == "SERVICE_UNAVAILABLE"
        assert running.store.count() == running.store.receipt_count() == 0
    with sandbox(SandboxConfig(port=0, fail_rate=1.0)) as running:
        response = put(client, running, [msg("f-1")])
        assert response.status_code == 503
        assert "retry-after" not in response.headers


def test_request_faults_follow_the_seed(client: httpx.Client) -> None:
    def statuses(seed: int) -> list[int]:
        config = SandboxConfig(port=0, fail_rate=0.5, seed=seed)
        with sandbox(config) as running:
            return [put(client, running, [msg(f"q-{i}")]).status_code for i in range(16)]

    first = statuses(seed=3)
    assert set(first) == {200, 503}
    assert statuses(seed=3) == first
    assert statuses(seed=4) != first


def test_error_after_store_answers_500_but_keeps_the_messages(client: httpx.Client) -> None:
    with sandbox(SandboxConfig(port=0, error_after_store_rate=1.0)) as running:
        response = put(client, running, [msg("e-1"), msg("e-2")])
        assert response.status_code == 500
        assert response.json()["errors"][0]["errorCode"] == "INTERNAL_ERROR"
        assert [m.source_uuid for m in running.store.messages()] == ["e-1", "e-2"]
        assert put(client, running, [msg("e-1")]).status_code == 500
        assert running.store.count() == 2
        assert running.store.duplicate_receipts() == 1


def test_garble_answers_200_with_html_after_storing(client: httpx.Client) -> None:
    with sandbox(SandboxConfig(port=0, garble_rate=1.0)) as running:
        response = put(client, running, [msg("g-1")])
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        with pytest.raises(json.JSONDecodeError):
            response.json()
        assert [m.source_uuid for m in running.store.messages()] == ["g-1"]


def test_reject_rate_rejects_the_same_messages_every_time(
    client: httpx.Client, answer_schema: dict[str, Any]
) -> None:
    ids = [f"rej-{i}" for i in range(40)]

    def rejected(running: RunningSandbox) -> list[str]:
        answer = put(client, running, [msg(i) for i in ids]).json()
        validate(answer, answer_schema, cls=OAS30Validator)
        failed: list[str] = answer["failedSourceUuids"]
        for entry in answer["saveMessageResponse"]:
            if entry["sourceUuid"] in failed:
                [error] = entry["errors"]
                assert error["errorCode"] == "REJECTED"
                assert error["errorDescription"]
                assert_uuid4(error["errorUID"])
                assert "messageUuid" not in entry
        assert sorted(answer["succesfullySubmittedSourceUuids"] + failed) == sorted(ids)
        return failed

    with sandbox(SandboxConfig(port=0, reject_rate=0.5, seed=11)) as running:
        first = rejected(running)
        assert 0 < len(first) < len(ids)
        assert rejected(running) == first  # a re-send is rejected again
        stored = {m.source_uuid for m in running.store.messages()}
        assert stored == set(ids) - set(first)
    with sandbox(SandboxConfig(port=0, reject_rate=0.5, seed=11)) as running:
        assert rejected(running) == first
    with sandbox(SandboxConfig(port=0, reject_rate=0.5, seed=12)) as running:
        assert rejected(running) != first


# --- lifecycle -------------------------------------------------------------------------------


def test_restart_on_the_same_database_keeps_the_data(client: httpx.Client, tmp_path: Path) -> None:
    config = SandboxConfig(port=0, db=tmp_path / "sandbox.db")
    with sandbox(config) as running:
        first = put(client, running, [msg("k-1"), msg("k-2")]).json()
    with sandbox(config) as running:
        stored = running.store.messages()
        assert [m.source_uuid for m in stored] == ["k-1", "k-2"]
        assert [m.message_uuid for m in stored] == [
            e["messageUuid"] for e in first["saveMessageResponse"]
        ]
        again = put(client, running, [msg("k-1")]).json()
        assert again["saveMessageResponse"][0]["warnings"][0]["warningCode"] == (
            "DUPLICATE_SOURCE_UUID"
        )
        assert stats(client, running) == {
            "stored": 2,
            "receipts": 3,
            "duplicates": 1,
            "requests": 1,  # request counts belong to one server's life
            "statuses": {"200": 1},
        }


def test_temporary_database_is_removed_on_stop() -> None:
    running = start_sandbox(SandboxConfig(port=0))
    path = running.store.path
    assert path.is_file()
    assert running.base_url == f"http://127.0.0.1:{running.port}/communications"
    running.stop()
    running.stop()  # idempotent
    assert not path.parent.exists()


def test_busy_port_is_a_sandbox_error(shared: RunningSandbox) -> None:
    with pytest.raises(SandboxError, match="cannot listen") as caught:
        start_sandbox(SandboxConfig(port=shared.port))
    assert isinstance(caught.value, UsageError)
    assert caught.value.hint


def test_unopenable_database_is_a_sandbox_error(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="cannot open"):
        start_sandbox(SandboxConfig(port=0, db=tmp_path / "missing" / "sandbox.db"))


@pytest.mark.parametrize(
    "bad",
    [
        {"fail_rate": 1.5},
        {"reject_rate": -0.1},
        {"fail_rate": 0.6, "garble_rate": 0.6},
        {"port": 70000},
        {"rate_limit": 0},
        {"rate_burst": 0.5},
        {"max_request_bytes": 0},
        {"latency_ms": float("nan")},
    ],
)
def test_config_refuses_impossible_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as caught:
        SandboxConfig(**bad)
    assert isinstance(caught.value, UsageError)


def test_serve_runs_in_the_foreground_until_interrupted(
    client: httpx.Client, tmp_path: Path
) -> None:
    db = tmp_path / "served.db"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from histimport.sandbox import SandboxConfig, serve\n"
        "config = SandboxConfig(port=0, db=Path(sys.argv[1]))\n"
        "serve(config, on_ready=lambda url: print(url, flush=True))\n"
    )
    src = Path(histimport.sandbox.__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
    }
    with subprocess.Popen(
        [sys.executable, "-c", script, str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/communications")
        assert ":0/" not in base_url
        url = f"{base_url}/department/d/customer/c/communication/historical"
        response = client.put(url, json={"saveMessageRequestList": [msg("fg-1")]})
        assert response.status_code == 200
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    # uvicorn stops gracefully, then re-raises the interrupt for the caller.
    assert proc.returncode in (-signal.SIGINT, 130)
    assert "KeyboardInterrupt" in stderr
    with SandboxStore(db) as store:
        assert [m.source_uuid for m in store.messages()] == ["fg-1"]


# --- the store on its own --------------------------------------------------------------------


def test_store_is_safe_from_several_threads(tmp_path: Path) -> None:
    with SandboxStore(tmp_path / "s.db") as store:

        def save(worker: int) -> None:
            for batch in range(10):
                store.save("d", f"c-{worker}", [msg(f"t-{worker}-{batch}-{i}") for i in range(5)])

        threads = [threading.Thread(target=save, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert store.count() == store.receipt_count() == 400
        assert store.duplicate_receipts() == 0
        mine = [m.source_uuid for m in store.messages(department="d", customer="c-3")]
        assert mine == [f"t-3-{b}-{i}" for b in range(10) for i in range(5)]
