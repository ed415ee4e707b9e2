"""Streaming: the first request within a second, reading and sending at once, and a state dir
that keeps ids, not messages. Run by `make bench` after run.py.

    .venv/bin/python bench/stream.py [--messages 1000000] [--customers 10000]
                                     [--sorted-messages 200000] [--sorted-customers 2000]

1. On the large interleaved export (1,000,000 messages, 10,000 customers), against the
   benchmark server at 20 ms requiring a password: a wrong password's exit 3, and when the
   first request reached the server, both in seconds from the client's start.
2. The same export imported whole at 0 ms: the state dir's size, sampled every 50 ms, at
   its peak and after the run, against the export's size; and whether any message body is
   left in it (a phrase every body holds).
3. The export sorted by customer (200,000 messages, 2,000 customers: 2,000 requests), at
   20 ms and 100 requests/s (a token bucket with a burst of one second): histimport's wall
   time against the 20 s the limit allows, and against the bare script's in the same run.

Exits 1 if a run does not store every message or a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gen_data import INBOUND, OUTBOUND, data_file
from run import DATA, OUT, Profile, Server, client_argv, client_env, reap


def tree_bytes(path: Path) -> int:
    """Bytes on disk of the files under `path` (what they take, holes left out)."""
    return sum(file_bytes(path).values())


def file_bytes(path: Path) -> dict[str, int]:
    """Bytes on disk of the files under `path` by kind: the spill files together, each
    database with its write-ahead log."""
    sizes: dict[str, int] = {}
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # deleted since it was listed
                kind = "spill" if name.startswith("spill-") else name.split("-")[0]
                size = os.stat(os.path.join(root, name)).st_blocks * 512
                sizes[kind] = sizes.get(kind, 0) + size
    return sizes


class Sampler:
    """The peak size of a directory, sampled in a thread."""

    def __init__(self, path: Path, every: float = 0.05) -> None:
        self.path = path
        self.peak = 0
        self.at_peak: dict[str, int] = {}  # bytes by kind of file, at the peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            sizes = file_bytes(self.path)
            if sum(sizes.values()) > self.peak:
                self.peak, self.at_peak = sum(sizes.values()), sizes

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def first_contact(source: Path, workdir: Path) -> dict[str, Any]:
    """A wrong password, then a right one stopped after its first request."""
    server = Server(Profile("auth", 20.0), "memory", workdir / "server.log", ("--username", "u"))
    try:
        env = {**client_env(), "HISTIMPORT_USERNAME": "u", "HISTIMPORT_PASSWORD": "wrong"}
        argv = client_argv("histimport", source, server.base_url, workdir)
        started = time.monotonic()
        wall, _, code = reap(argv, cwd=workdir, env=env, timeout=600)
        first = server.get("/_bench/window")["first"]
    finally:
        server.stop()
    shutil.rmtree(workdir / "state", ignore_errors=True)
    return {
        "refusedExit": code,
        "refusedAfter": wall,
        "firstRequestAfter": None if first is None else first - started,
    }


def state_dir_run(source: Path, messages: int, workdir: Path) -> dict[str, Any]:
    """The whole export at 0 ms, the state dir watched."""
    server = Server(Profile("0ms", 0.0), "memory", workdir / "server.log")
    state = workdir / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    sampler = Sampler(state)
    try:
        argv = client_argv("histimport", source, server.base_url, workdir)
        wall, usage, code = reap(argv, cwd=workdir, env=client_env(), timeout=3600)
        stored = server.get("/_sandbox/stats")["stored"]
    finally:
        peak = sampler.stop()
        server.stop()
    after = tree_bytes(state)
    phrases = [INBOUND[0].split("{")[0].encode(), OUTBOUND[0].split("{")[0].encode()]
    content = [
        str(path.name)
        for path in state.iterdir()
        if path.is_file() and any(p in path.read_bytes() for p in phrases)
    ]
    shutil.rmtree(state, ignore_errors=True)
    return {
        "exit": code,
        "stored": stored,
        "wall": wall,
        "cpuPerMessage": (usage.ru_utime + usage.ru_stime) / messages * 1e6,
        "peakBytes": peak,
        "atPeak": sampler.at_peak,
        "afterBytes": after,
        "filesWithContent": content,
    }


def sorted_run(source: Path, messages: int, workdir: Path, client: str) -> dict[str, Any]:
    """The export sorted by customer, at 20 ms and 100 requests/s."""
    profile = Profile("ratelimited", 20.0, 100.0)
    server = Server(profile, "memory", workdir / "server.log")
    try:
        argv = client_argv(client, source, server.base_url, workdir)
        shutil.rmtree(workdir / "state", ignore_errors=True)
        wall, _, code = reap(argv, cwd=workdir, env=client_env(), timeout=1800)
        stored = server.get("/_sandbox/stats")["stored"]
    finally:
        server.stop()
    shutil.rmtree(workdir / "state", ignore_errors=True)
    return {"exit": code, "stored": stored, "wall": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--sorted-messages", type=int, default=200_000)
    parser.add_argument("--sorted-customers", type=int, default=2_000)
    args = parser.parse_args()
    workdir = OUT / "stream"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    big = data_file(DATA, args.messages, args.customers)
    by_customer = data_file(DATA, args.sorted_messages, args.sorted_customers, by_customer=True)
    size = big.stat().st_size
    ok = True

    contact = first_contact(big, workdir)
    first = contact["firstRequestAfter"]
    print(f"{args.messages:,} messages over {args.customers:,} customers ({size / 1e6:.0f} MB)")
    print(f"wrong password: exit {contact['refusedExit']} after {contact['refusedAfter']:.2f} s")
    print(f"first request reached the server after {first:.2f} s" if first else "no request")
    ok &= contact["refusedExit"] == 3 and contact["refusedAfter"] <= 3.0
    ok &= first is not None and first <= 2.0

    whole = state_dir_run(big, args.messages, workdir)
    print(
        f"whole run at 0 ms: exit {whole['exit']}, stored {whole['stored']:,}, "
        f"wall {whole['wall']:.1f} s, client CPU {whole['cpuPerMessage']:.1f} µs/msg"
    )
    print(
        f"state dir: peak {whole['peakBytes'] / 1e6:.1f} MB ({whole['peakBytes'] / size:.2f} x "
        f"the export), after {whole['afterBytes'] / 1e6:.1f} MB "
        f"({whole['afterBytes'] / args.messages:.0f} bytes a message), "
        f"files with message content after: {whole['filesWithContent'] or 'none'}"
    )
    parts = sorted(whole["atPeak"].items(), key=lambda kv: -kv[1])
    print("at the peak: " + ", ".join(f"{kind} {n / 1e6:.1f} MB" for kind, n in parts))
    ok &= whole["exit"] == 0 and whole["stored"] == args.messages
    ok &= whole["peakBytes"] <= size and whole["afterBytes"] <= 200 * args.messages
    ok &= not whole["filesWithContent"]

    ideal = args.sorted_customers * -(-args.sorted_messages // args.sorted_customers // 100)
    floor = ideal / 100.0
    results = {
        c: sorted_run(by_customer, args.sorted_messages, workdir, c) for c in ("histimport", "bare")
    }
    for client, result in results.items():
        print(
            f"sorted by customer, {args.sorted_messages:,} messages at 100 req/s: {client} "
            f"exit {result['exit']}, stored {result['stored']:,}, wall {result['wall']:.1f} s "
            f"({result['wall'] / floor:.2f} x the {floor:.0f} s the limit allows)"
        )
        ok &= result["exit"] == 0 and result["stored"] == args.sorted_messages
    ratio = results["histimport"]["wall"] / results["bare"]["wall"]
    print(f"histimport wall / bare wall: {ratio:.2f}")
    ok &= results["histimport"]["wall"] <= 1.1 * floor
    print("PASS" if ok else "FAIL")
    (workdir / "results.json").write_text(
        json.dumps({"contact": contact, "whole": whole, "sorted": results}, indent=2)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
