"""Pacing against rate limiters of several shapes, and a run against a dead platform.

    python bench/pacing.py                   # every shape, 600 and 2,000 requests
    python bench/pacing.py --shapes nginx --requests 2000 --clients histimport

Each shape limits the endpoint to `--limit` requests/s (100) with `--latency` ms (20)
before every answer:

| shape | what answers a request over the limit |
|---|---|
| `bucket-small` | a token bucket with a burst of 0.1 s: 429 with `Retry-After` |
| `bucket-small-bare` | the same, with a bare 429 (no `Retry-After`) |
| `fixed` | a fixed window of each clock second: 429 with `Retry-After` |
| `nginx` | a real nginx in front: `limit_req rate=100r/s burst=10 nodelay`, its default 503 |
| `bucket-1s` | a token bucket with a burst of one second (the sandbox's default): 429 |

Every request carries 10 messages (`--chunk-size 10`), two requests a customer, so that
2,000 requests are 20,000 messages over 1,000 customers; at the limit they need 20 s.
For each (shape, size, client): the share of the limit sustained over the server's send
window (first request in, last answer out; the burst the limiter grants at once left out)
and the share of requests refused. The clients: (a) `histimport load`, and (c) the bare
async script, which sleeps `Retry-After` (or a second) on a 429 or a 503.

Then a dead platform: a server that answers 500 to everything (histimport with
`--give-up-after 30`: it must end within 30 + 60 s, every message listed, exit 1), and a
closed port from the start (it must end within 30 s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_data import data_file
from run import (
    BENCH,
    DATA,
    OUT,
    Profile,
    Server,
    byte_compile,
    client_env,
    machine,
    reap,
)
from run import client_argv as run_client_argv

sys.path.insert(0, str(BENCH.parent))
from tests.nginx import ProxyRules, running_nginx

SHAPES = ("bucket-small", "bucket-small-bare", "fixed", "nginx", "bucket-1s")
MIN_SHARE = 0.9
MAX_REFUSED = 0.05
CHUNK = 10
REQUESTS_PER_CUSTOMER = 2


@dataclass(frozen=True)
class Shape:
    name: str
    server_args: tuple[str, ...]
    burst: float  # requests the limiter lets through at once, left out of the share
    behind_nginx: bool = False


def shapes(limit: float) -> dict[str, Shape]:
    rate = ("--rate-limit", str(limit))
    small = ("--rate-burst", str(limit / 10))
    return {
        "bucket-small": Shape("bucket-small", (*rate, *small), limit / 10),
        "bucket-small-bare": Shape(
            "bucket-small-bare", (*rate, *small, "--no-retry-after"), limit / 10
        ),
        "fixed": Shape("fixed", (*rate, "--rate-window", "fixed"), 0.0),
        "nginx": Shape("nginx", (), 10.0, behind_nginx=True),
        "bucket-1s": Shape("bucket-1s", rate, limit),
    }


def _server(latency: float, extra: tuple[str, ...], log: Path) -> Server:
    return Server(Profile("pacing", latency), "memory", log, extra)


@dataclass
class Row:
    shape: str
    requests: int
    client: str
    exit_code: int
    stored: int
    messages: int
    sent: int  # requests the client sent (the server's and nginx's refusals included)
    refused: int
    ok: int
    window: float
    share: float
    detail: dict[str, Any]

    @property
    def refused_share(self) -> float:
        return self.refused / max(self.sent, 1)


def run_shape(
    shape: Shape, requests: int, client: str, args: argparse.Namespace, source: Path
) -> Row:
    messages = requests * CHUNK
    workdir = OUT / f"pacing-{shape.name}-{requests}-{client}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with ExitStack() as stack:
        server = _server(args.latency, shape.server_args, workdir / "server.log")
        stack.callback(server.stop)
        base_url = server.base_url
        nginx = None
        if shape.behind_nginx:
            port = int(server.base_url.split(":")[2].split("/")[0])
            rules = ProxyRules(
                drop_percent=0,
                rate=int(args.limit),
                burst=10,
                max_body_bytes=8 * 1024 * 1024,
                limit_status=503,
            )
            nginx = stack.enter_context(running_nginx(workdir / "nginx", port, rules))
            base_url = nginx.base_url
        argv = client_argv(client, source, base_url, workdir)
        _, _, code = reap(argv, cwd=workdir, env=client_env(), timeout=args.timeout)
        stats = server.get("/_sandbox/stats")
        window = server.get("/_bench/window")
        statuses = Counter({k: int(v) for k, v in stats["statuses"].items()})
        if nginx is not None:
            refused_by_proxy = nginx.statuses()
            statuses["503"] += refused_by_proxy.get("503", 0)
    refused = statuses["429"] + statuses["503"]
    ok = int(window["ok"])
    seconds = float(window["seconds"] or 0.0)
    share = (ok - shape.burst) / seconds / args.limit if seconds else 0.0
    detail = {}
    if (workdir / "report.json").exists():
        detail = json.loads((workdir / "report.json").read_text())
    row = Row(
        shape.name,
        requests,
        client,
        code,
        int(stats["stored"]),
        messages,
        sum(statuses.values()),
        refused,
        ok,
        seconds,
        share,
        detail,
    )
    print(
        f"  {shape.name:<18} {requests:>5} {client:<10} exit {code}  stored {row.stored:>6}/"
        f"{messages}  sustained {share:5.1%}  refused {refused:>3} of {row.sent} "
        f"({row.refused_share:.1%})  window {seconds:5.1f} s",
        flush=True,
    )
    return row


def client_argv(client: str, source: Path, base_url: str, workdir: Path) -> list[str]:
    return run_client_argv(client, source, base_url, workdir, chunk_size=CHUNK)


def dead_platform(args: argparse.Namespace, source: Path, messages: int) -> list[str]:
    lines = []
    workdir = OUT / "pacing-dead-500"
    workdir.mkdir(parents=True, exist_ok=True)
    server = _server(args.latency, ("--error-rate", "1.0"), workdir / "server.log")
    try:
        argv = [
            *client_argv("histimport", source, server.base_url, workdir),
            "--give-up-after",
            "30",
        ]
        wall, _, code = reap(argv, cwd=workdir, env=client_env(), timeout=600)
    finally:
        server.stop()
    failed = json.loads((workdir / "failed.json").read_text())
    listed = sum(failed["counts"].values())
    verdict = "PASS" if wall <= 90 and code == 1 and listed == messages else "FAIL"
    lines.append(
        f"{verdict}  500 to everything, --give-up-after 30: ended after {wall:.1f} s "
        f"(limit 90), exit {code}, {listed} of {messages} messages listed"
    )

    workdir = OUT / "pacing-closed-port"
    workdir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = client_argv("histimport", source, f"http://127.0.0.1:{port}/communications", workdir)
    wall, _, code = reap(argv, cwd=workdir, env=client_env(), timeout=600)
    failed = json.loads((workdir / "failed.json").read_text())
    # The first request, sent alone before the export is read, finds the port closed: the
    # failed file says where each source's rest begins (its first line).
    rest = [f for f in failed["failures"] if f["errors"][0]["errorCode"] == "NOT_READ"]
    verdict = "PASS" if wall <= 30 and code == 1 and [f["line"] for f in rest] == [1] else "FAIL"
    lines.append(
        f"{verdict}  closed port from the start: ended after {wall:.1f} s (limit 30), "
        f"exit {code}, the failed file reads on from line {rest[0]['line'] if rest else '?'}"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--requests", default="600,2000", help="comma-separated sizes")
    parser.add_argument("--clients", default="histimport,bare")
    parser.add_argument("--limit", type=float, default=100.0)
    parser.add_argument("--latency", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-dead", action="store_true", help="skip the dead platform runs")
    args = parser.parse_args()
    known = shapes(args.limit)
    names = [s for s in args.shapes.split(",") if s]
    sizes = [int(n) for n in args.requests.split(",") if n]
    clients = [c for c in args.clients.split(",") if c]

    started = time.monotonic()
    byte_compile()
    print(f"machine: {machine()}")
    print(
        f"limit {args.limit:g} requests/s, {args.latency:g} ms latency, {CHUNK} messages a request"
    )
    rows = []
    for requests in sizes:
        source = data_file(DATA, requests * CHUNK, requests // REQUESTS_PER_CUSTOMER)
        for name in names:
            for client in clients:
                rows.append(run_shape(known[name], requests, client, args, source))

    print()
    print("| shape | requests | client | sustained ÷ limit | refused | exit |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.shape} | {r.requests} | {r.client} | {r.share:.0%} | "
            f"{r.refused} of {r.sent} ({r.refused_share:.1%}) | {r.exit_code} |"
        )
    print()
    for r in rows:
        if r.client != "histimport":
            continue
        good = r.share >= MIN_SHARE and r.refused_share <= MAX_REFUSED
        print(
            f"{'PASS' if good else 'FAIL'}  {r.shape}, {r.requests} requests: {r.share:.0%} of "
            f"the limit sustained (>= 90%), {r.refused_share:.1%} refused (<= 5%)"
        )
    failed = [r for r in rows if r.exit_code != 0 or r.stored != r.messages]
    if not args.no_dead:
        source = data_file(DATA, 20_000, 1000)
        for line in dead_platform(args, source, 20_000):
            print(line)
    print(f"total bench time {time.monotonic() - started:.0f} s")
    for r in failed:
        print(
            f"ERROR: {r.shape} / {r.requests} / {r.client}: exit {r.exit_code}, stored {r.stored}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
