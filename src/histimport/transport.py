"""The run's requests: HTTP/1.1 through h11 on asyncio's streams, one connection a worker.

Every request of a run is a PUT of a body prepared whole, with the same headers each time,
and its answer is read whole, up to a bound. httpx's client, its transport and httpcore's
connection under them (anyio's cancel scopes, locks, request and response models, URL
merging) cost about twice what the exchange itself does: about 1.2 against 0.5 ms of CPU a
request (bench/README.md). `Http11Sender` speaks HTTP/1.1 through h11, the protocol
machine httpx's own transport uses, and raises httpx's exceptions, with httpx's words, for
what httpx would raise them for: the retry policy reads them alike. A run through a proxy
keeps httpx's client: httpx reads the proxy settings only for the transports it builds.
"""

from __future__ import annotations

import asyncio
import re
import select
import ssl
import time
import zlib

import h11
import httpx

Reply = tuple[int, httpx.Headers, bytes | None]
"""An answer's status, headers and body; None for a body beyond the bound."""

_READ_BYTES = 64 * 1024
_HEAD_BYTES = 100 * 1024
"""The largest answer head accepted, as httpx's own transport sets it (h11's own is 16 KiB)."""
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*")
"""A request target with nothing in it to percent-encode."""
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Connection:
    """One TCP (or TLS) connection and the HTTP/1.1 state of its exchanges."""

    def __init__(
        self,
        origin: tuple[str, str, int],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.origin = origin
        scheme, host, port = origin
        authority = f"[{host}]" if ":" in host else host
        self.authority = authority if port == _DEFAULT_PORTS[scheme] else f"{authority}:{port}"
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=_HEAD_BYTES)
        self.idle_since = time.monotonic()
        self.answered = 0  # exchanges completed on it
        self.received = 0  # bytes of the current answer received so far

    def reusable(self, origin: tuple[str, str, int], expiry: float) -> bool:
        """Whether the next request may go out on it. Anything the server sent while it was
        idle (a late 408 some proxies send at their idle timeout), its end of stream or an
        error means the server is done with it. What asyncio has read already is in the
        reader (its buffer: a private attribute of StreamReader, stable since asyncio's
        first release); what arrived since it last looked, in the socket, which is polled,
        as httpx does: a run may go from one answer to the next request without yielding
        to the event loop."""
        reader = self.reader
        if (
            origin != self.origin
            or self.http.our_state is not h11.IDLE
            or time.monotonic() - self.idle_since >= expiry
            or bool(getattr(reader, "_buffer", b""))
            or reader.at_eof()
            or reader.exception() is not None
            or self.writer.is_closing()
        ):
            return False
        sock = self.writer.get_extra_info("socket")
        return sock is None or not _readable(sock.fileno())

    def close(self) -> None:
        self.writer.close()


class Http11Sender:
    """One worker's requests, one at a time, over one connection: kept alive, and replaced
    when the server closes it, lets it expire, or it is wanted for another origin."""

    def __init__(
        self,
        headers: dict[str, str],
        timeout: httpx.Timeout,
        bound: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = 5.0,
    ) -> None:
        # What it decodes, it asks for: without Accept-Encoding any coding would do.
        self._headers = [("accept-encoding", "gzip, deflate")] + [
            (name.lower(), value)
            for name, value in headers.items()
            if name.lower() != "accept-encoding"
        ]
        self._timeout = timeout
        self._bound = bound
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._connection: _Connection | None = None
        self._busy = False
        self._origins: dict[str, tuple[str, str, int]] = {}
        self.resent = 0

    async def put(self, url: str, body: bytes) -> Reply:
        if self._busy:
            raise RuntimeError("Http11Sender sends one request at a time")
        self._busy = True
        try:
            origin, target = self._parts(url)
            connection = await self._ready(origin)
            try:
                return await self._exchange(connection, target, body)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                self._forget(connection)
                if not connection.answered or connection.received:
                    raise
            except BaseException:
                # Cut short (an error, a cancellation): its state is unknown, never reused.
                self._forget(connection)
                raise
            # A kept connection ended with no byte of an answer: the server closed it
            # as the request went out (its idle timeout). Once more on a new connection, as
            # browsers, curl and Go's client do for a request that may be repeated (a PUT:
            # the platform keys messages by sourceUuid); a new connection that fails alike
            # is the request's failure.
            self.resent += 1
            connection = await self._ready(origin)
            try:
                return await self._exchange(connection, target, body)
            except BaseException:
                self._forget(connection)
                raise
        finally:
            self._busy = False

    async def aclose(self) -> None:
        if self._connection is not None:
            self._forget(self._connection)

    def _parts(self, url: str) -> tuple[tuple[str, str, int], str]:
        """(scheme, host, port) and the request target. A run's URLs share their origin,
        which is worked out once."""
        at = url.find("/", url.find("://") + 3) if "://" in url else -1
        prefix, target = (url, "/") if at < 0 else (url[:at], url[at:])
        origin = self._origins.get(prefix)
        if origin is None:
            origin = self._origins[prefix] = _origin(prefix)
        target = target.partition("#")[0]
        if _PLAIN_TARGET.fullmatch(target) is None:
            target = httpx.URL(url).raw_path.decode("ascii")  # percent-encoded as httpx does
        return origin, target

    async def _ready(self, origin: tuple[str, str, int]) -> _Connection:
        """The kept connection if it can take a request now, else a new one."""
        connection = self._connection
        if connection is not None and not connection.reusable(origin, self._keepalive_expiry):
            self._forget(connection)
            connection = None
        if connection is None:
            connection = self._connection = await self._connect(origin)
        return connection

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            tls = self._ssl_context or ssl.create_default_context()
        try:
            async with asyncio.timeout(self._timeout.connect):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                    # An address that drops packets (IPv6 behind some firewalls) does not
                    # use up the timeout: the next is tried after 0.25 s, as httpx does.
                    happy_eyeballs_delay=0.25,
                )
        except TimeoutError as exc:  # before OSError, of which it is one
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except (OSError, UnicodeError) as exc:
            # ssl.SSLError among them (CERTIFICATE_VERIFY_FAILED, ...); a UnicodeError for a
            # name the resolver cannot encode (an empty label: "api..example.com").
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return _Connection(origin, reader, writer)

    async def _exchange(self, connection: _Connection, target: str, body: bytes) -> Reply:
        http = connection.http
        connection.received = 0
        headers = [
            ("host", connection.authority),
            *self._headers,
            ("content-length", str(len(body))),
        ]
        try:
            data = http.send(h11.Request(method="PUT", target=target, headers=headers))
            data += http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        try:
            async with asyncio.timeout(self._timeout.write):
                connection.writer.write(data)
                await connection.writer.drain()
        except TimeoutError as exc:  # before OSError, of which it is one
            raise httpx.WriteTimeout("timed out writing the request") from exc
        except OSError:
            # As httpx does: a server may answer (a 413, say) and close before it has read
            # the whole request; its answer, if any, is still read.
            pass
        event = await self._event(connection)
        while isinstance(event, h11.InformationalResponse):  # 100 Continue and the like
            event = await self._event(connection)
        if not isinstance(event, h11.Response):
            raise httpx.RemoteProtocolError(f"expected an answer, got {type(event).__name__}")
        status, answer_headers = event.status_code, httpx.Headers(event.headers)
        parts = []
        size = 0
        while not isinstance(event := await self._event(connection), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise httpx.RemoteProtocolError(f"expected a body, got {type(event).__name__}")
            size += len(event.data)
            if size > self._bound:
                self._forget(connection)  # the rest of the answer is left unread
                return status, answer_headers, None
            parts.append(event.data)
        connection.answered += 1
        if (
            http.our_state is h11.DONE
            and http.their_state is h11.DONE
            and not any(http.trailing_data)
        ):
            http.start_next_cycle()
            connection.idle_since = time.monotonic()
        else:
            # "Connection: close", an HTTP/1.0 answer, or bytes past the answer (a stray
            # line end): the next answer could not be told from them.
            self._forget(connection)
        content = b"".join(parts)
        coding = answer_headers.get("content-encoding")
        if coding is None or not content:
            return status, answer_headers, content
        try:
            return status, answer_headers, _decoded(content, coding, self._bound)
        except httpx.DecodingError:
            if 200 <= status < 300:
                raise
            # An error answer is told by its status; its body would only describe it.
            return status, answer_headers, b""

    async def _event(self, connection: _Connection) -> h11.Event:
        http = connection.http
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                async with asyncio.timeout(self._timeout.read):
                    data = await connection.reader.read(_READ_BYTES)
            except TimeoutError as exc:
                raise httpx.ReadTimeout("timed out reading the answer") from exc
            except OSError as exc:
                # What was read before the error (a 413 or 401 sent before a reset) is
                # still the answer: the reader raises its error before handing it out.
                data = _take_buffered(connection.reader)
                if not data:
                    raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
            if not data and http.their_state is h11.SEND_RESPONSE:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            connection.received += len(data)
            http.receive_data(data)

    def _forget(self, connection: _Connection) -> None:
        connection.close()
        if self._connection is connection:
            self._connection = None


def _readable(fd: int) -> bool:
    if not hasattr(select, "poll"):  # Windows
        return bool(select.select([fd], [], [], 0)[0])
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


def _take_buffered(reader: asyncio.StreamReader) -> bytes:
    buffer = getattr(reader, "_buffer", None)
    if not buffer:
        return b""
    data = bytes(buffer)
    buffer.clear()
    return data


def _decoded(content: bytes, coding: str, bound: int) -> bytes | None:
    """An answer's body without its content codings, or None past the bound. As httpx does,
    gzip and deflate are undone and any other coding left as it is."""
    for name in reversed([c.strip().lower() for c in coding.split(",")]):
        if name not in _DECODERS:
            continue  # identity, or a coding it was not asked for ("utf-8", seen in the wild)
        decoded = _decode(content, name, bound)
        if decoded is None:
            return None
        content = decoded
    return content


def _decode(content: bytes, name: str, bound: int) -> bytes | None:
    # Some servers send deflate raw, without its zlib wrapper: httpx reads both.
    for wbits in (_DECODERS[name], -zlib.MAX_WBITS) if name == "deflate" else (_DECODERS[name],):
        decoder = zlib.decompressobj(wbits)
        try:
            decoded = decoder.decompress(content, bound + 1)
        except zlib.error:
            continue
        if len(decoded) > bound:
            return None
        if decoder.eof:
            return decoded
    raise httpx.DecodingError(f"the answer's {name} body is corrupt or cut short")


def _origin(url: str) -> tuple[str, str, int]:
    """As httpx reads it: a host name in ASCII (IDNA), for connecting, SNI and Host."""
    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise httpx.UnsupportedProtocol(f"Request URL {url!r}: {exc}") from exc
    scheme = parts.scheme
    if scheme not in _DEFAULT_PORTS or not parts.raw_host:
        raise httpx.UnsupportedProtocol(f"Request URL {url!r} is not an http(s) URL.")
    return scheme, parts.raw_host.decode("ascii"), parts.port or _DEFAULT_PORTS[scheme]
