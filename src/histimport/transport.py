"""httpx's connections, on asyncio's streams.

httpx's own transport reaches its sockets through anyio: every read and write of a request
enters and leaves a cancel scope, which with the rest of that layer cost a third of the
client's CPU per request (bench/README.md). This transport runs httpcore's own HTTP/1.1
connections (keep-alive, TLS, timeouts) over a network backend built on asyncio's streams,
and raises the same exceptions. A run through a proxy keeps httpx's client and transport:
httpx reads the proxy settings only when it builds its transports itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
}
"""httpcore's errors and the httpx errors they are raised as (httpx's own mapping)."""
_HTTPCORE_ERRORS = tuple(_ERRORS)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except _HTTPCORE_ERRORS as exc:
        # The most specific: a ReadTimeout is an httpx.ReadTimeout, not a TimeoutException.
        mapped = next(_ERRORS[cls] for cls in type(exc).__mro__ if cls in _ERRORS)
        raise mapped(str(exc)) from exc


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection, TCP or TLS, as httpcore reads and writes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:  # before OSError, of which it is one
            raise httpcore.ReadTimeout("timed out reading the answer") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(buffer)
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout("timed out writing the request") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from exc
        except OSError as exc:  # ssl.SSLError among them: CERTIFICATE_VERIFY_FAILED, ...
            await self.aclose()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Asked of an idle connection before it is used again: anything the server sent
            # since its last answer (a late 408 before it hangs up, as some proxies send at
            # their idle timeout), its end of stream, or an error means it is done with.
            # asyncio reads the socket as data comes, so the reader's buffer tells: a
            # private attribute of StreamReader, stable since asyncio's first release.
            reader = self._reader
            unread = getattr(reader, "_buffer", b"")
            return (
                bool(unread)
                or reader.at_eof()
                or reader.exception() is not None
                or (self._writer.is_closing())
            )
        names = {"client_addr": "sockname", "server_addr": "peername"}
        if info in ("ssl_object", "socket", "client_addr", "server_addr"):
            return self._writer.get_extra_info(names.get(info, info))
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens httpcore's TCP connections with asyncio (which sets TCP_NODELAY)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = writer.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: Any, closed: Callable[[], None]) -> None:
        self._stream = stream
        self._closed = closed

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        try:
            with _as_httpx_errors():
                await self._stream.aclose()
        finally:
            self._closed()


class AsyncioTransport(httpx.AsyncBaseTransport):
    """httpx's HTTP/1.1 transport, without a proxy, over `AsyncioBackend`, for a caller that
    sends one request at a time (a worker of the run): one connection, kept alive and
    replaced when it closes or expires, with no pool to share it (the pool's locks and
    events cost a tenth of the CPU of a request)."""

    def __init__(
        self, *, ssl_context: ssl.SSLContext | None = None, keepalive_expiry: float = 5.0
    ) -> None:
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._backend = AsyncioBackend()
        self._connection: httpcore.AsyncHTTPConnection | None = None
        self._busy = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._busy:
            raise RuntimeError("AsyncioTransport sends one request at a time")
        url = request.url
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        self._busy = True
        try:
            with _as_httpx_errors():
                response = await self._send(core_request)
        except BaseException:
            self._busy = False
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream, self._done),
            extensions=response.extensions,
        )

    async def _send(self, request: httpcore.Request) -> httpcore.Response:
        for _ in range(3):
            connection = await self._ready(request.url.origin)
            try:
                return await connection.handle_async_request(request)
            except httpcore.ConnectionNotAvailable:
                # Closed before this request went out (as the pool does: another one).
                self._connection = None
        raise httpcore.ConnectError("no connection could be made available")

    async def _ready(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        """The kept connection if it can take a request now, else a new one."""
        connection = self._connection
        if connection is not None and (
            not connection.can_handle_request(origin)
            or not connection.is_available()
            or connection.has_expired()
        ):
            self._connection = None
            await connection.aclose()
            connection = None
        if connection is None:
            connection = self._connection = httpcore.AsyncHTTPConnection(
                origin=origin,
                ssl_context=self._ssl_context,
                keepalive_expiry=self._keepalive_expiry,
                network_backend=self._backend,
            )
        return connection

    def _done(self) -> None:
        self._busy = False

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()
