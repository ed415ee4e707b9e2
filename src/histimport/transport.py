"""The run's requests, through httpx's public API, and the one place where httpx's
exceptions become the project's own.

Every request of a run is a PUT of a body prepared whole, with the same headers each time;
its answer is read whole, up to a bound. Each `Sender` is an `httpx.AsyncClient` with one
connection (a shared pool scans all of its connections on every request, encode/httpx#3215,
for no gain here: a sender has one request in flight), and takes the environment's proxies
as httpx reads them (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`). The same path
serves a direct run, a proxied one, and a test's `httpx.MockTransport`.

What can go wrong on the way is one of a small family, which the retry policy reads:

    SendError                the request got no (whole) answer
     +-- ConnectFailed       no connection: nothing reached the server
     |    +-- Untrusted      its TLS certificate could not be verified
     +-- ProxyRefused        a proxy would not open a tunnel to it
     +-- TimedOut            no answer in time; `sent` says whether the request had left
     +-- ConnectionLost      the connection ended before a whole answer came
     +-- ProtocolBroken      what came back is not HTTP, or its body cannot be decoded
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import importlib.util
import ssl
import urllib.request
from collections.abc import Iterator

import httpx

Reply = tuple[int, httpx.Headers, bytes | None]
"""An answer's status, headers and body; None for a body beyond the bound."""


class SendError(Exception):
    """A request that got no (whole) answer; the message says what happened."""


class ConnectFailed(SendError):
    """No connection could be made: nothing reached the server."""


class Untrusted(ConnectFailed):
    """The server's TLS certificate could not be verified."""


class ProxyRefused(SendError):
    """A proxy would not open a tunnel to the platform (its answer to CONNECT)."""

    @property
    def status(self) -> int | None:
        """The proxy's status, when it said one (httpcore words it "STATUS REASON")."""
        word = str(self).split(" ", 1)[0]
        return int(word) if word.isdigit() else None


class TimedOut(SendError):
    """No answer in time: before the request was sent (connecting, waiting for a
    connection) or after it (writing it, or reading the answer)."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class ConnectionLost(SendError):
    """The connection ended before a whole answer came."""


class ProtocolBroken(SendError):
    """The server's answer is not HTTP, or its body cannot be decoded."""


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """httpx's exceptions, as the project's own."""
    try:
        yield
    except httpx.ProxyError as exc:
        raise ProxyRefused(str(exc)) from exc
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise Untrusted(_words(exc)) from exc
        raise ConnectFailed(_words(exc)) from exc
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise TimedOut(_words(exc), sent=False) from exc
    except httpx.TimeoutException as exc:  # writing or reading: the server may have it all
        raise TimedOut(_words(exc), sent=True) from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError) as exc:
        raise ConnectionLost(_words(exc)) from exc
    except (httpx.ProtocolError, httpx.DecodingError) as exc:
        raise ProtocolBroken(_words(exc)) from exc
    except httpx.TransportError as exc:  # UnsupportedProtocol, and what httpx may add
        raise ConnectFailed(_words(exc)) from exc


def _words(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _NoCookies(http.cookiejar.CookieJar):
    """Cookies a server or a proxy sets are not kept: the endpoint takes Basic auth on every
    request, and httpx would otherwise parse every answer's headers for them."""

    def extract_cookies(self, response: object, request: object) -> None:
        return None


def _environment_proxies() -> list[str]:
    """The proxies the environment names for http, https or all (NO_PROXY is no proxy)."""
    proxies = urllib.request.getproxies()
    return [url for scheme in ("http", "https", "all") if (url := proxies.get(scheme))]


def proxies_set() -> bool:
    """Whether the environment names a proxy for http or https."""
    return bool(_environment_proxies())


def unusable_proxy() -> str | None:
    """Why a proxy the environment names cannot be used, or None: told before anything is
    read, rather than at the first request."""
    for url in _environment_proxies():
        try:
            proxy = httpx.Proxy(url)
        except (ValueError, httpx.InvalidURL) as exc:
            return f"{url}: {exc}"
        if proxy.url.scheme.startswith("socks") and importlib.util.find_spec("socksio") is None:
            return f"{url}: a SOCKS proxy needs the socksio package"
    return None


class Sender:
    """One request at a time, through one `httpx.AsyncClient` with one connection: redirects
    never followed, cookies not kept, the answer read up to a bound.

    A kept-alive connection that the server closes just as a request leaves (its idle
    timeout) yields no byte of an answer: the request is sent once more, at once, on a new
    connection, without counting as an attempt (`resent`). On a fresh connection, the same
    is the request's failure."""

    def __init__(
        self,
        *,
        headers: dict[str, str],
        timeout: float,
        bound: int,
        auth: tuple[str, str] | None,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._bound = bound
        self._client = httpx.AsyncClient(
            auth=httpx.BasicAuth(*auth) if auth is not None else None,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            follow_redirects=False,
            cookies=_NoCookies(),
            verify=verify,
            transport=transport,
        )
        self._kept = False  # whether the last answer left a connection kept alive
        self._answered = False  # whether the current request's answer began to come
        self.resent = 0

    async def put(self, url: str, body: bytes) -> Reply:
        """The answer: raises a SendError for none. The whole exchange is bounded by twice
        the timeout: connecting, then each read and write, have the timeout each, and an
        answer that trickles in cannot hold the run forever."""
        try:
            async with asyncio.timeout(2 * self._timeout):
                kept, self._kept = self._kept, False
                try:
                    return await self._put(url, body)
                except ConnectionLost:
                    if not kept or self._answered:
                        raise  # a fresh connection, or part of an answer came: no re-send
                    self.resent += 1
                    return await self._put(url, body)
        except TimeoutError:
            raise TimedOut(
                f"no whole answer within twice --timeout ({2 * self._timeout:g} s)", sent=True
            ) from None

    async def _put(self, url: str, body: bytes) -> Reply:
        self._answered = False
        with translated():
            async with self._client.stream("PUT", url, content=body) as response:
                self._answered = True  # its head came: the server took the request
                try:
                    content = await _read_bounded(response, self._bound)
                except httpx.DecodingError:
                    if response.is_success:
                        raise
                    content = b""  # an error answer is told by its status
                closing = response.headers.get("connection", "").lower() == "close"
        self._kept = content is not None and not closing and response.http_version == "HTTP/1.1"
        return response.status_code, response.headers, content

    async def aclose(self) -> None:
        await self._client.aclose()


async def _read_bounded(response: httpx.Response, bound: int) -> bytes | None:
    """The body, or None once it exceeds the bound: a huge answer is never read whole."""
    parts = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > bound:
            return None
        parts.append(part)
    return b"".join(parts)
