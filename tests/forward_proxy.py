"""A real forward proxy (tinyproxy) on a free loopback port, run from a temporary directory:
what `HTTP_PROXY` names in a corporate network."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .binaries import free_port, required, wait_listening

_START_TIMEOUT = 10.0
_INSTALL_HINT = "apt-get install tinyproxy"


def tinyproxy_binary() -> str:
    """The tinyproxy executable (see tests/binaries.py)."""
    return required("tinyproxy", install=_INSTALL_HINT)


@dataclass(frozen=True)
class RunningProxy:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines it forwarded ("PUT http://... HTTP/1.1"), from its log."""
        if not self.log.exists():
            return []
        marker = "): "
        return [
            line.split(marker, 1)[1]
            for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines()
            if "Request (file descriptor" in line and marker in line
        ]


@contextmanager
def running_tinyproxy(directory: Path) -> Iterator[RunningProxy]:
    """tinyproxy in the foreground on a free loopback port, until exit."""
    binary = tinyproxy_binary()
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = directory / "tinyproxy.log"
    conf = directory / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 64\nLogLevel Info\n"
        f'LogFile "{log}"\nPidFile "{directory / "tinyproxy.pid"}"\nAllow 127.0.0.1\n'
        "DisableViaHeader Yes\n",
        encoding="utf-8",
    )
    with (directory / "stderr.log").open("ab") as stderr:
        process = subprocess.Popen(
            [binary, "-d", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    try:
        wait_listening(process, port, name="tinyproxy", timeout=_START_TIMEOUT, log=log)
        yield RunningProxy(port, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
