"""A real nginx as a reverse proxy in front of a sandbox, run from a temporary directory.

The proxy misbehaves the way proxies in front of real platforms do: it drops a share of
connections without an answer (444), rate-limits with a bare 429 (no Retry-After) and
refuses large bodies with its own HTML 413.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .binaries import free_port, required, wait_listening

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_INSTALL_HINT = "apt-get install nginx (or nginx-light)"
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str:
    """The nginx executable (see tests/binaries.py)."""
    return required("nginx", install=_INSTALL_HINT)


@dataclass(frozen=True, kw_only=True)
class ProxyRules:
    """How the proxy misbehaves."""

    #: Share of requests whose connection is closed without an answer, in percent.
    drop_percent: float = 2.0
    #: limit_req: requests per second (one zone for every client), and the burst allowed.
    rate: int = 150
    burst: int = 10
    #: client_max_body_size, in bytes: larger bodies get nginx's own 413 page.
    max_body_bytes: int = 48 * 1024
    #: limit_req_status: what a request over the rate is answered (nginx's default is 503).
    limit_status: int = 429


@dataclass(frozen=True)
class RunningNginx:
    port: int
    directory: Path

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/communications"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def statuses(self) -> Counter[str]:
        """Statuses nginx answered with (444: dropped unanswered), from its access log."""
        counts: Counter[str] = Counter()
        if self.access_log.exists():
            for line in self.access_log.read_text(encoding="utf-8").splitlines():
                counts[line.split(" ", 1)[0]] += 1
        return counts


def _version(binary: str) -> tuple[int, ...]:
    banner = subprocess.run(
        [binary, "-v"], capture_output=True, text=True, check=False, timeout=10
    ).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", banner)
    return tuple(int(part) for part in match.groups()) if match else (0, 0, 0)


def _config(directory: Path, port: int, upstream_port: int, rules: ProxyRules) -> str:
    d = directory
    # As root, the workers would otherwise run as nobody, who cannot read the temp dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {d / kind};" for kind in _TEMP_KINDS)
    drop = f"        {rules.drop_percent:g}% 1;\n" if rules.drop_percent else ""
    return f"""\
{user}daemon off;
master_process on;
worker_processes 1;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
events {{
    worker_connections 256;
}}
http {{
    log_format brief '$status $msec $request_length $upstream_status';
    access_log {d / "access.log"} brief;
{temp}
    client_max_body_size {rules.max_body_bytes};
    client_body_buffer_size 64k;
    split_clients "${{request_id}}" $drop {{
{drop}        * 0;
    }}
    limit_req_zone $server_port zone=importer:1m rate={rules.rate}r/s;
    limit_req_status {rules.limit_status};
    server {{
        listen 127.0.0.1:{port};
        location / {{
            if ($drop) {{
                return 444;
            }}
            limit_req zone=importer burst={rules.burst} nodelay;
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT)


@contextmanager
def running_nginx(
    directory: Path, upstream_port: int, rules: ProxyRules | None = None
) -> Iterator[RunningNginx]:
    """nginx on a free loopback port proxying to 127.0.0.1:`upstream_port`, until exit."""
    binary = nginx_binary()
    rules = rules or ProxyRules()
    directory.mkdir(parents=True, exist_ok=True)
    for kind in _TEMP_KINDS:
        (directory / kind).mkdir(exist_ok=True)
    # -e (nginx 1.19.5+) keeps nginx from opening the packaged error log before the config's.
    early_log = ["-e", str(directory / "error.log")] if _version(binary) >= (1, 19, 5) else []
    last_error: Exception | None = None
    for _ in range(3):  # the free port may be taken by someone else before nginx binds it
        port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(_config(directory, port, upstream_port, rules), encoding="utf-8")
        with (directory / "stderr.log").open("ab") as stderr:
            process = subprocess.Popen(
                [binary, "-c", str(conf), "-p", str(directory), *early_log],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        try:
            wait_listening(
                process, port, name="nginx", timeout=_START_TIMEOUT, log=directory / "error.log"
            )
        except RuntimeError as exc:
            _stop(process)
            if "Address already in use" not in str(exc):
                raise
            last_error = exc
            continue
        try:
            yield RunningNginx(port, directory)
        finally:
            _stop(process)
        return
    raise RuntimeError(f"nginx did not start: {last_error}")
