"""Checking rows in forked workers: same results, in order, whatever happens to a worker."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

import histimport.fanout as fanout_module
from histimport import validate
from histimport.config import Config
from histimport.fanout import Fanout

from .factory import message, write_jsonl


def square_all(batch: list[int]) -> list[int]:
    if batch == [13]:
        raise ValueError("unlucky batch")
    return [n * n for n in batch]


def test_results_come_back_in_order() -> None:
    batches = [list(range(n, n + 7)) for n in range(0, 700, 7)]
    with Fanout(square_all, 3) as fanout:
        assert list(fanout.map(batches)) == [square_all(b) for b in batches]


def sizes(batch: bytes) -> bytes:
    return batch[:1] * (len(batch) * 3)  # a result three times its batch


@pytest.mark.parametrize("roomy", [True, False])
def test_batches_and_results_of_any_size_come_back_in_order(
    roomy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small batches queue behind a worker's current one; large ones (and results larger
    than a pipe holds) wait for an idle worker; with pipes that cannot be enlarged, every
    batch waits for one. Nothing blocks, whatever the mix."""
    if not roomy:
        monkeypatch.setattr(fanout_module, "_enlarge", lambda fd: False)
    lengths = [10, 300_000, 10, 2_000_000, 600_000, 10, 10, 1_500_000, 1_500_000, 10] * 2
    batches = [bytes([65 + n % 26]) * length for n, length in enumerate(lengths)]
    for workers in (1, 2):
        with Fanout(sizes, workers) as fanout:
            assert list(fanout.map(batches)) == [sizes(b) for b in batches]


def test_a_dead_worker_s_batch_is_done_here() -> None:
    batches = [[n] for n in range(50)]
    with Fanout(lambda b: (os.getpid(), b), 2) as fanout:
        pids = fanout.pids
        results = []
        for i, result in enumerate(fanout.map(batches)):
            results.append(result)
            if i == 10:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
    assert [b for _, b in results] == batches
    assert {pid for pid, _ in results[:5]} <= set(pids)
    assert {pid for pid, _ in results[-5:]} == {os.getpid()}


def test_an_error_in_the_work_is_raised_here() -> None:
    with Fanout(square_all, 2) as fanout, pytest.raises(ValueError, match="unlucky"):
        list(fanout.map([[1], [13], [2]]))


def test_a_worker_keeps_no_file_of_the_main_process(tmp_path: Path) -> None:
    with open(tmp_path / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with Fanout(square_all, 1) as fanout:
            (pid,) = fanout.pids
            assert list(fanout.map([[3]])) == [[9]]  # the worker is serving by now
            open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        assert lock.fileno() not in open_fds
        assert len(open_fds) == 5  # stdin, stdout, stderr and its two pipe ends


def test_workers_die_with_the_main_process() -> None:
    code = (
        "import os, signal, sys\n"
        "from histimport.fanout import Fanout\n"
        "fanout = Fanout(len, 2)\n"
        "print(' '.join(map(str, fanout.pids)), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == -signal.SIGKILL
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_checking_in_workers_gives_what_checking_here_gives(workdir: Path) -> None:
    rows: list[Any] = [message(f"d{n % 3}", f"c{n % 17}", n) for n in range(3000)]
    rows[5]["sentOn"] = "yesterday"
    rows[700]["messageAttributes"]["isManual"] = "yes"
    rows[1400]["customerUUID"] = "a/b"
    rows[2999]["receivedOn"] = "1999-01-01T00:00:00Z"
    write_jsonl(workdir / "e.jsonl", rows)
    with open(workdir / "e.jsonl", "ab") as f:
        f.write(b'{"truncated": \n\n[1, 2]\n')
    outcomes = []
    for workers in (0, 1, 3):
        config = Config(
            state_dir=workdir / "state",
            failed_out=workdir / f"f{workers}.json",
            check_workers=workers,
        )
        result = validate(["e.jsonl"], config)
        document = orjson.loads((workdir / f"f{workers}.json").read_bytes())
        outcomes.append((result.counts, result.warnings, document["failures"]))
    assert outcomes[0] == outcomes[1] == outcomes[2]
    counts, warnings, failures = outcomes[0]
    assert counts["read"] == 3002 and counts["rejected"] == 5
    assert [f["line"] for f in failures] == [6, 701, 1401, 3001, 3003]
    assert [w["line"] for w in warnings] == [3000]


def test_a_gzipped_source_checked_in_workers_reads_the_same(workdir: Path) -> None:
    import gzip

    rows: list[Any] = [message("d", f"c{n % 7}", n) for n in range(2000)]
    rows[1234]["sentOn"] = "not a time"
    plain = write_jsonl(workdir / "e.jsonl", rows)
    (workdir / "e.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    results = []
    for name, workers in (("e.jsonl", 0), ("e.jsonl.gz", 2)):
        config = Config(state_dir=workdir / name, failed_out=workdir / f"{name}.failed.json")
        result = validate([name], replace(config, check_workers=workers))
        failures = orjson.loads((workdir / f"{name}.failed.json").read_bytes())["failures"]
        results.append((result.counts, [(f["line"], f["errors"]) for f in failures]))
    assert results[0] == results[1]
    assert results[0][1][0][0] == 1235


@pytest.mark.parametrize("value", ["-1", "65", "many"])
def test_check_workers_out_of_range_is_a_usage_error(workdir: Path, value: str) -> None:
    from typer.testing import CliRunner

    from histimport.cli import app

    write_jsonl(workdir / "e.jsonl", [message("d", "c", 1)])
    result = CliRunner().invoke(app, ["validate", "e.jsonl", "--check-workers", value])
    assert result.exit_code == 2
