"""Benchmark `histimport load` against the script a user would write instead (naive.py) and a
bare asynchronous script (bare_async.py), under several server profiles.

    python bench/run.py                      # 100,000 messages over 1,000 customers
    python bench/run.py --quick              # 10,000 over 100
    python bench/run.py --profiles 20ms --messages 50000 --repeat 3
    python bench/run.py --cprofile           # cProfile of `histimport load` at 0 ms only

Every run gets a fresh server process (bench/server.py) and, for histimport, a fresh state
dir; each client is a subprocess reaped with os.wait4, which gives its own CPU time and peak
RSS. After each run the server's /_sandbox/stats must show every message stored. Targets
are printed as PASS/FAIL and are informational: the exit status is 0 unless a run crashed or
did not deliver everything.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen_data import data_file

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "data"
OUT = BENCH / "out"
BIN = Path(sys.executable).parent

CLIENTS = ("histimport", "naive", "session", "bare")
CLIENT_LABELS = {
    "histimport": "(a) histimport load",
    "naive": "(b) naive, requests.put",
    "session": "(b') naive, one session",
    "bare": "(c) bare async x8",
}

# Targets (informational).
MIN_SPEEDUP_VS_NAIVE = 5.0
MAX_RATIO_VS_BARE = 1.2
MAX_CPU_US_PER_MSG = 25.0
MAX_CPU_RATIO_VS_BARE = 1.0
MIN_SHARE_OF_LIMIT = 0.9
MAX_429_SHARE = 0.05
MAX_RSS_MIB = 200.0


@dataclass(frozen=True)
class Profile:
    name: str
    latency_ms: float
    rate_limit: float | None = None

    def describe(self) -> str:
        text = f"{self.latency_ms:g} ms latency"
        if self.rate_limit:
            text += f", {self.rate_limit:g} requests/s limit (429 + Retry-After)"
        return text


@dataclass
class Result:
    profile: Profile
    client: str
    messages: int
    wall: float
    cpu: float
    rss_kib: int
    exit_code: int
    stored: int
    statuses: dict[str, int]
    window: float | None
    server_cpu: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.stored == self.messages

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu / self.messages * 1e6

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024

    @property
    def count_200(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def count_429(self) -> int:
        return self.statuses.get("429", 0)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def sustained_share(self) -> float | None:
        """Accepted requests per second over the send window, as a share of the rate limit,
        leaving out the burst the server's token bucket grants at once (one second's worth);
        None without a limit, or when the run fitted in that burst."""
        limit = self.profile.rate_limit
        if not limit or not self.window or self.count_200 <= limit:
            return None
        return (self.count_200 - limit) / self.window / limit


class Server:
    """bench/server.py in its own process, with a profile's latency and rate limit."""

    def __init__(
        self, profile: Profile, store: str, log: Path, extra: tuple[str, ...] = ()
    ) -> None:
        argv = [sys.executable, str(BENCH / "server.py"), "--latency", str(profile.latency_ms)]
        argv += ["--store", store, *extra]
        if profile.rate_limit:
            argv += ["--rate-limit", str(profile.rate_limit)]
        self._log_path = log
        self._log = log.open("w")
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._log)
        self.base_url = self._wait_ready()
        self.root_url = self.base_url.rsplit("/", 1)[0]

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for line in self._log_path.read_text().splitlines():
                if "serving " in line:
                    return line.split("serving ", 1)[1].strip()
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not start; see {self._log_path}")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.root_url + path, timeout=60) as answer:
            return json.load(answer)

    def stop(self) -> float:
        """Stop the server; returns its CPU seconds (user + sys)."""
        cpu = 0.0
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            timer = threading.Timer(15, self.process.kill)
            timer.start()
            _, status, usage = os.wait4(self.process.pid, 0)
            timer.cancel()
            self.process.returncode = os.waitstatus_to_exitcode(status)
            cpu = usage.ru_utime + usage.ru_stime
        self._log.close()
        return cpu


def reap(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> tuple:
    """Run argv to completion; (wall seconds, rusage of that process alone, exit code)."""
    with (cwd / "stdout.txt").open("wb") as out, (cwd / "stderr.txt").open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage, process.returncode


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTIMPORT_")}
    env["HISTIMPORT_USERNAME"] = "bench"
    env["HISTIMPORT_PASSWORD"] = "bench"
    return env


def client_argv(
    client: str, source: Path, base_url: str, workdir: Path, chunk_size: int | None = None
) -> list[str]:
    """A client's command line; `chunk_size` other than the clients' own 100 (histimport
    and the bare script only)."""
    chunk = [] if chunk_size is None else ["--chunk-size", str(chunk_size)]
    if client == "histimport":
        return [
            str(histimport_bin()),
            "load",
            str(source),
            "--base-url",
            base_url,
            "--state-dir",
            str(workdir / "state"),
            "--failed-out",
            str(workdir / "failed.json"),
            "--report",
            str(workdir / "report.json"),
            "--quiet",
            *chunk,
        ]
    script = {"naive": "naive.py", "session": "naive.py", "bare": "bare_async.py"}[client]
    argv = [sys.executable, str(BENCH / script), str(source), "--base-url", base_url]
    if client == "bare":
        argv += chunk
    return [*argv, "--session"] if client == "session" else argv


def histimport_bin() -> Path:
    local = BIN / "histimport"
    if local.exists():
        return local
    found = shutil.which("histimport")
    if found is None:
        raise SystemExit("histimport is not installed: run `make bench` (it installs it)")
    return Path(found)


def run_one(
    profile: Profile, client: str, source: Path, messages: int, args: argparse.Namespace, n: int
) -> Result:
    workdir = OUT / f"{profile.name}-{client}-{n}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    server = Server(profile, args.store, workdir / "server.log")
    try:
        argv = client_argv(client, source, server.base_url, workdir)
        wall, usage, code = reap(argv, cwd=workdir, env=client_env(), timeout=args.timeout)
        stats = server.get("/_sandbox/stats")
        window = server.get("/_bench/window")
    finally:
        server_cpu = server.stop()
    detail: dict[str, Any] = {}
    if client == "histimport" and (workdir / "report.json").exists():
        detail = json.loads((workdir / "report.json").read_text())
    elif (workdir / "stdout.txt").stat().st_size:
        try:
            detail = json.loads((workdir / "stdout.txt").read_text().splitlines()[-1])
        except (ValueError, IndexError):
            detail = {}
    result = Result(
        profile=profile,
        client=client,
        messages=messages,
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        rss_kib=usage.ru_maxrss,
        exit_code=code,
        stored=stats["stored"],
        statuses=stats["statuses"],
        window=window["seconds"],
        server_cpu=server_cpu,
        detail=detail,
    )
    state = "ok" if result.ok else f"NOT OK (exit {code}, stored {result.stored}/{messages})"
    print(
        f"  {profile.name:<12} {CLIENT_LABELS[client]:<22} {wall:8.2f} s  "
        f"{result.cpu_us_per_msg:7.1f} µs/msg  {result.rss_mib:6.1f} MiB  {state}",
        flush=True,
    )
    if result.ok:
        # The ledger holds a copy of every message: keep it only to look into a failure.
        shutil.rmtree(workdir / "state", ignore_errors=True)
    else:
        print(f"    see {workdir}/stderr.txt", flush=True)
    return result


def median_run(runs: list[Result]) -> Result:
    ordered = sorted(runs, key=lambda r: r.wall)
    return ordered[(len(ordered) - 1) // 2]


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def print_tables(results: list[Result], profiles: list[Profile]) -> None:
    print()
    print(
        "| profile | client | wall s | msg/s | client CPU µs/msg | peak RSS MiB "
        "| wall ÷ (b) | wall ÷ (c) | server send window s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for profile in profiles:
        rows = {r.client: r for r in results if r.profile == profile}
        naive, bare = rows.get("naive"), rows.get("bare")
        for client in CLIENTS:
            r = rows.get(client)
            if r is None:
                continue
            mark = "" if r.ok else " (INCOMPLETE)"
            print(
                f"| {profile.name} | {CLIENT_LABELS[client]}{mark} | {r.wall:.2f} "
                f"| {r.messages / r.wall:,.0f} | {r.cpu_us_per_msg:.1f} | {r.rss_mib:.1f} "
                f"| {fmt(r.wall / naive.wall if naive else None)} "
                f"| {fmt(r.wall / bare.wall if bare else None)} | {fmt(r.window)} |"
            )
    reports = [r for r in results if r.client == "histimport" and r.detail]
    if reports:
        print()
        print("histimport's own report per profile:")
        print()
        for r in reports:
            d = r.detail
            print(
                f"- {r.profile.name}: elapsedSeconds {d.get('elapsedSeconds')}, requests "
                f"{d.get('requests')}, retries {d.get('retries')}, statusCodes "
                f"{d.get('statusCodes')}, finalConcurrency {d.get('finalConcurrency')}"
            )
    limited = [p for p in profiles if p.rate_limit]
    for profile in limited:
        assert profile.rate_limit is not None
        print()
        print(f"Rate-limited profile `{profile.name}`: {profile.describe()}.")
        print()
        print(
            f"The server's token bucket lets a burst of {profile.rate_limit:g} requests through "
            "at once; *sustained* leaves that burst out: (200s - burst) ÷ send window ÷ limit."
        )
        print()
        print(
            "| client | requests | 200 | 429 | 429 share | 200/s over send window "
            "| ÷ limit | sustained ÷ limit | 200/s over whole run | ÷ limit |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for client in CLIENTS:
            r = next((x for x in results if x.profile == profile and x.client == client), None)
            if r is None:
                continue
            window_rate = r.count_200 / r.window if r.window else None
            run_rate = r.count_200 / r.wall
            print(
                f"| {CLIENT_LABELS[client]} | {r.requests} | {r.count_200} | {r.count_429} "
                f"| {r.count_429 / max(r.requests, 1):.1%} | {fmt(window_rate, 1)} "
                f"| {fmt(window_rate / profile.rate_limit if window_rate else None)} "
                f"| {fmt(r.sustained_share)} "
                f"| {run_rate:.1f} | {run_rate / profile.rate_limit:.2f} |"
            )


def verdict(ok: bool | None) -> str:
    return "SKIP" if ok is None else ("PASS" if ok else "FAIL")


def check_targets(results: list[Result]) -> list[str]:
    def find(profile: str, client: str) -> Result | None:
        return next((r for r in results if r.profile.name == profile and r.client == client), None)

    lines = []
    h20, n20, b20 = find("20ms", "histimport"), find("20ms", "naive"), find("20ms", "bare")
    speedup = n20.wall / h20.wall if h20 and n20 else None
    lines.append(
        f"{verdict(None if speedup is None else speedup >= MIN_SPEEDUP_VS_NAIVE)}  "
        f"20ms: histimport >= {MIN_SPEEDUP_VS_NAIVE:g}x faster than (b) naive: "
        f"{fmt(speedup)}x"
    )
    s20 = find("20ms", "session")
    if h20 and s20:
        lines.append(
            f"info  20ms: histimport vs (b') naive with one session: {s20.wall / h20.wall:.2f}x"
        )
    ratio = h20.wall / b20.wall if h20 and b20 else None
    lines.append(
        f"{verdict(None if ratio is None else ratio <= MAX_RATIO_VS_BARE)}  "
        f"20ms: histimport wall <= {MAX_RATIO_VS_BARE:g}x (c) bare async: {fmt(ratio)}x"
    )
    h0, b0 = find("0ms", "histimport"), find("0ms", "bare")
    cpu = h0.cpu_us_per_msg if h0 else None
    cpu_ratio = cpu / b0.cpu_us_per_msg if cpu is not None and b0 else None
    lines.append(
        f"{verdict(None if cpu_ratio is None else cpu_ratio <= MAX_CPU_RATIO_VS_BARE)}  "
        f"0ms: histimport client CPU <= {MAX_CPU_RATIO_VS_BARE:g}x (c) bare async's: "
        f"{fmt(cpu_ratio)}x"
    )
    lines.append(
        f"{verdict(None if cpu is None else cpu <= MAX_CPU_US_PER_MSG)}  "
        f"0ms: histimport client CPU <= {MAX_CPU_US_PER_MSG:g} µs/message: {fmt(cpu, 1)} µs"
    )
    hl = next((r for r in results if r.profile.rate_limit and r.client == "histimport"), None)
    if hl is not None and hl.window and hl.profile.rate_limit:
        share = hl.sustained_share
        raw = hl.count_200 / hl.window / hl.profile.rate_limit
        whole = hl.count_200 / hl.wall / hl.profile.rate_limit
        share_429 = hl.count_429 / max(hl.requests, 1)
        shown = (
            "limit not reached: the run fitted in the burst" if share is None else f"{share:.0%}"
        )
        lines.append(
            f"{verdict(None if share is None else share >= MIN_SHARE_OF_LIMIT)}  "
            f"{hl.profile.name}: histimport throughput within {1 - MIN_SHARE_OF_LIMIT:.0%} of the "
            f"limit (sustained, send window): {shown} ({raw:.0%} with the burst, {whole:.0%} over "
            "the whole run with start-up and staging)"
        )
        lines.append(
            f"{verdict(share_429 <= MAX_429_SHARE)}  {hl.profile.name}: few 429s "
            f"(<= {MAX_429_SHARE:.0%} of requests): {hl.count_429} of {hl.requests} "
            f"({share_429:.1%})"
        )
    else:
        lines.append("SKIP  rate-limited: throughput within 10% of the limit")
        lines.append("SKIP  rate-limited: few 429s")
    ours = [r for r in results if r.client == "histimport"]
    peak = max((r.rss_mib for r in ours), default=None)
    lines.append(
        f"{verdict(None if peak is None else peak <= MAX_RSS_MIB)}  "
        f"histimport peak RSS <= {MAX_RSS_MIB:g} MiB (all profiles): {fmt(peak, 1)} MiB"
    )
    return lines


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
        f"{platform.machine()}, Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}"
    )


def run_cprofile(source: Path, messages: int, args: argparse.Namespace) -> None:
    """cProfile of `histimport load` at 0 ms; prints the top functions both ways."""
    profile = Profile("0ms", 0.0)
    workdir = OUT / "cprofile"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    output = workdir / "histimport-load-0ms.prof"
    server = Server(profile, args.store, workdir / "server.log")
    try:
        argv = [sys.executable, "-m", "cProfile", "-o", str(output), "-m", "histimport"]
        argv += client_argv("histimport", source, server.base_url, workdir)[1:]
        wall, usage, code = reap(argv, cwd=workdir, env=client_env(), timeout=args.timeout)
        stats = server.get("/_sandbox/stats")
    finally:
        server.stop()
    shutil.rmtree(workdir / "state", ignore_errors=True)
    print(
        f"cProfile run: {messages} messages, exit {code}, stored {stats['stored']}, "
        f"wall {wall:.2f} s, CPU {usage.ru_utime + usage.ru_stime:.2f} s (profiler overhead "
        f"included); profile in {output}"
    )
    for order in ("tottime", "cumulative"):
        print(f"\n--- top {args.top} by {order} ---")
        pstats.Stats(str(output)).sort_stats(order).print_stats(args.top)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, help="messages in the export (100000)")
    parser.add_argument("--customers", type=int, help="customers in the export (1000)")
    parser.add_argument("--quick", action="store_true", help="10,000 messages, 100 customers")
    parser.add_argument(
        "--profiles", default="0ms,20ms,ratelimited", help="comma-separated: 0ms,20ms,ratelimited"
    )
    parser.add_argument(
        "--clients", default=",".join(CLIENTS), help="histimport,naive,session,bare"
    )
    parser.add_argument("--latency", type=float, default=20.0, help="ms of the 20ms profile")
    parser.add_argument(
        "--rate-limit",
        type=float,
        help="requests/s of the rate-limited profile (100; 20 with --quick)",
    )
    parser.add_argument(
        "--ratelimited-latency", type=float, default=20.0, help="ms of the rate-limited profile"
    )
    parser.add_argument(
        "--store",
        choices=("memory", "sqlite"),
        default="memory",
        help="server storage: memory (default) or the sandbox's SQLite store",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is kept")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per client run")
    parser.add_argument(
        "--cprofile", action="store_true", help="only profile `histimport load` at 0 ms"
    )
    parser.add_argument("--top", type=int, default=25, help="functions listed by --cprofile")
    args = parser.parse_args()
    default_messages, default_customers = (10_000, 100) if args.quick else (100_000, 1_000)
    args.messages = args.messages or default_messages
    args.customers = args.customers or default_customers
    args.rate_limit = args.rate_limit or (20.0 if args.quick else 100.0)
    return args


def byte_compile() -> None:
    """Byte-compile histimport and the scripts, as pip does when it installs a package. An
    editable install run with PYTHONDONTWRITEBYTECODE set (as on some CI machines) would
    otherwise compile histimport's modules again in every run: 50 to 100 ms that no
    installed copy pays."""
    import histimport

    for directory in (Path(histimport.__file__).parent, BENCH):
        compileall.compile_dir(directory, quiet=1)


def main() -> int:
    args = parse_args()
    known = {
        "0ms": Profile("0ms", 0.0),
        "20ms": Profile("20ms", args.latency),
        "ratelimited": Profile("ratelimited", args.ratelimited_latency, args.rate_limit),
    }
    names = [p.strip() for p in args.profiles.split(",") if p.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = [n for n in names if n not in known] + [c for c in clients if c not in CLIENTS]
    if unknown:
        raise SystemExit(f"unknown profile or client: {', '.join(unknown)}")
    profiles = [known[n] for n in names]

    started = time.monotonic()
    byte_compile()
    source = data_file(DATA, args.messages, args.customers)
    size_mb = source.stat().st_size / 1e6
    print(f"machine: {machine()}")
    print(
        f"data: {source.relative_to(BENCH.parent)}: {args.messages:,} messages over "
        f"{args.customers:,} customers, interleaved, {size_mb:.1f} MB "
        f"({size_mb * 1e6 / args.messages:.0f} bytes/message)"
    )
    # uvicorn parses HTTP with httptools when it is installed (the bench extra), else h11.
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    print(f"server: bench/server.py, {args.store} store, {parser}, a fresh process per run")
    if args.cprofile:
        run_cprofile(source, args.messages, args)
        return 0
    for profile in profiles:
        print(f"profile {profile.name}: {profile.describe()}")

    runs: dict[tuple[str, str], list[Result]] = {}
    for n in range(args.repeat):
        for profile in profiles:
            for client in clients:
                result = run_one(profile, client, source, args.messages, args, n)
                runs.setdefault((profile.name, client), []).append(result)
    results = [median_run(r) for r in runs.values()]

    print_tables(results, profiles)
    print()
    for line in check_targets(results):
        print(line)
    print()
    cpu_server = statistics.mean(r.server_cpu for r in results)
    print(
        f"median of {args.repeat} run(s) per cell; mean server CPU per run {cpu_server:.1f} s; "
        f"total bench time {time.monotonic() - started:.0f} s"
    )
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"ERROR: {r.profile.name} / {r.client}: exit {r.exit_code}, stored {r.stored}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
