"""Running the sandbox under uvicorn: in a background thread (tests, ``--sandbox``) or in the
foreground (``histimport sandbox``)."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

import uvicorn

from ..errors import UsageError
from .app import PREFIX, SandboxApp
from .config import SandboxConfig
from .store import SandboxStore

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5


class SandboxError(UsageError):
    """The sandbox could not start: its port or its database is unusable (exit 2)."""


class RunningSandbox:
    """A sandbox serving in a background thread until :meth:`stop`."""

    def __init__(
        self,
        *,
        config: SandboxConfig,
        app: SandboxApp,
        listener: socket.socket,
        server: uvicorn.Server,
        thread: threading.Thread,
        tmpdir: Path | None,
    ) -> None:
        self.config = config
        self.app = app
        self.store = app.store
        self.host = config.host
        self.port: int = listener.getsockname()[1]
        self._listener = listener
        self._server = server
        self._thread = thread
        self._tmpdir = tmpdir
        self._stopped = False

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT``, where the admin views live under ``/_sandbox/``."""
        return _root_url(self.host, self.port, tls=self.config.tls_cert is not None)

    @property
    def base_url(self) -> str:
        """The service root a client is configured with: ``http://HOST:PORT/communications``."""
        return f"{self.root_url}/{PREFIX}"

    def stop(self) -> None:
        """Stop serving, close the store and remove a temporary database; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._server.should_exit = True
        self._thread.join(_STOP_TIMEOUT)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(_STOP_TIMEOUT)
        self._listener.close()
        self.store.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_sandbox(config: SandboxConfig | None = None) -> RunningSandbox:
    """Serve the sandbox in a daemon thread; returns once it accepts requests.

    Without a config it listens on a free loopback port with a temporary database.
    """
    config = config or SandboxConfig(port=0)
    store, tmpdir = _open_store(config)
    try:
        listener = _listen(config.host, config.port)
    except SandboxError:
        _close_store(store, tmpdir)
        raise
    app = SandboxApp(config, store)
    # log_config=None leaves the host program's logging configuration alone.
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=listener.getsockname()[1],
        log_level="warning",
        log_config=None,
        lifespan="off",
        timeout_graceful_shutdown=_STOP_TIMEOUT,
        ssl_certfile=config.tls_cert,
        ssl_keyfile=config.tls_key,
    )
    server = uvicorn.Server(uv_config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name="histimport-sandbox", daemon=True
    )
    running = RunningSandbox(
        config=config, app=app, listener=listener, server=server, thread=thread, tmpdir=tmpdir
    )
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            running.stop()
            raise SandboxError(
                f"the sandbox did not start on {running.root_url}",
                hint="see the server's log messages above",
            )
        time.sleep(0.005)
    return running


@contextmanager
def sandbox(config: SandboxConfig | None = None) -> Iterator[RunningSandbox]:
    """``with sandbox(SandboxConfig(port=0)) as running:`` serve for the block's duration."""
    running = start_sandbox(config)
    try:
        yield running
    finally:
        running.stop()


def serve(config: SandboxConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve in the foreground until interrupted.

    ``on_ready`` receives the base URL once the port is bound (useful with port 0).
    Ctrl-C stops the server gracefully and then re-raises the signal.
    """
    store, tmpdir = _open_store(config)
    try:
        listener = _listen(config.host, config.port)
        try:
            port = listener.getsockname()[1]
            app = SandboxApp(config, store)
            uv_config = uvicorn.Config(
                app,
                host=config.host,
                port=port,
                log_level="warning",
                lifespan="off",
                ssl_certfile=config.tls_cert,
                ssl_keyfile=config.tls_key,
            )
            if on_ready is not None:
                tls = config.tls_cert is not None
                on_ready(f"{_root_url(config.host, port, tls=tls)}/{PREFIX}")
            uvicorn.Server(uv_config).run(sockets=[listener])
        finally:
            listener.close()
    finally:
        _close_store(store, tmpdir)


def _open_store(config: SandboxConfig) -> tuple[SandboxStore, Path | None]:
    tmpdir: Path | None = None
    if config.db is None:
        tmpdir = Path(tempfile.mkdtemp(prefix="histimport-sandbox-"))
        path = tmpdir / "sandbox.sqlite3"
    else:
        path = config.db
    try:
        return SandboxStore(path), tmpdir
    except sqlite3.Error as exc:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise SandboxError(
            f"cannot open the sandbox database {path}: {exc}",
            hint="check that the --db file's folder exists and is writable",
        ) from exc


def _close_store(store: SandboxStore, tmpdir: Path | None) -> None:
    store.close()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _listen(host: str, port: int) -> socket.socket:
    # Binding here rather than in uvicorn turns a busy port into an error the caller can
    # handle (uvicorn exits the process) and makes port 0 known before serving starts.
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        # proto must say TCP: asyncio only sets TCP_NODELAY on such sockets, and without it
        # every answer after the first waits ~40 ms for a delayed ACK.
        listener = socket.socket(family, kind, proto)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from exc
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen()
    except OSError as exc:
        listener.close()
        raise _cannot_listen(host, port, exc) from exc
    return listener


def _cannot_listen(host: str, port: int, exc: OSError) -> SandboxError:
    return SandboxError(
        f"cannot listen on {host}:{port}: {exc.strerror or exc}",
        hint="choose another --port, or 0 for any free one",
    )


def _root_url(host: str, port: int, *, tls: bool = False) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
