"""Deliver staged messages: httpx async, one retry policy, global back-pressure, adaptive
concurrency, a rate cap.

One request is in flight per customer (unless `unordered`): a customer's next chunk waits
for the final outcome of the previous one, through retries and splits, so the platform
stores each customer's history in file order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.cookiejar
import itertools
import ssl
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from . import __version__
from .batch import Chunk, Envelope, chunks
from .config import Config
from .errors import UsageError
from .ledger import Ledger, Outcome, Pending, State
from .policy import Action, Backoff, Decision, classify, classify_error, server_warnings, settle
from .transport import Http11Sender, Reply

# A 429 is the server (or a proxy) pacing us, not failing: it draws on its own, larger
# budget, so that a rate limit never makes the tool give up on a healthy message.
_THROTTLE_ATTEMPTS = 50
# On back-pressure the request rate is capped at this share of the rate just before it.
_RATE_CUT = 0.85


@dataclass
class DeliveryStats:
    """What the delivery did, for the report and the summary."""

    requests: int = 0
    retries: int = 0
    unknown_outcomes: int = 0
    splits: int = 0
    reconnects: int = 0
    server_warnings: int = 0
    abandoned: bool = False  # a second Ctrl-C abandoned requests in flight
    statuses: Counter[str] = field(default_factory=Counter)
    final_concurrency: int = 0
    aborted: str | None = None


class AdaptiveLimit:
    """AIMD concurrency between 1 and `ceiling`: +1 per window of successes, halved on
    back-pressure (at most once per second, so one burst of 429s counts once)."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self._in_flight = 0
        self._changed = asyncio.Condition()
        self._last_cut = 0.0

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_flight < self.current)
            self._in_flight += 1

    async def release(self, *, pressure: bool) -> None:
        now = time.monotonic()
        async with self._changed:
            self._in_flight -= 1
            if pressure:
                if now - self._last_cut >= 1.0:
                    self.limit = max(1.0, self.limit / 2)
                    self._last_cut = now
            else:
                self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)
            self._changed.notify_all()


class TokenBucket:
    """At most `rate` requests per second, with a burst of one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = 1.0
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(
                    max(self.rate, 1.0), self._tokens + (now - self._last) * self.rate
                )
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)


class AdaptiveRate:
    """The request rate, capped once the server pushes back.

    Lowering concurrency alone cannot slow a client below a proxy's rate when answers are
    fast, so a 429 also caps the rate at `_RATE_CUT` of the rate just measured (at
    most once a second); every success then raises the cap by 1/cap, about one request per
    second each second, until the next push-back. `--rate` is a ceiling throughout.
    """

    def __init__(self, ceiling: float | None) -> None:
        self.ceiling = ceiling
        self._bucket = TokenBucket(ceiling) if ceiling else None
        self._recent: deque[float] = deque(maxlen=512)
        self._last_cut = 0.0

    @property
    def cap(self) -> float | None:
        return self._bucket.rate if self._bucket else None

    async def take(self) -> None:
        if self._bucket is not None:
            await self._bucket.take()
        self._recent.append(time.monotonic())

    def pushed_back(self) -> None:
        now = time.monotonic()
        if now - self._last_cut < 1.0:
            return
        self._last_cut = now
        window = [t for t in self._recent if now - t <= 2.0]
        measured = len(window) / max(now - window[0], 0.5) if len(window) > 1 else 1.0
        cap = max(1.0, _RATE_CUT * min(measured, self.cap or measured))
        if self._bucket is None:
            self._bucket = TokenBucket(cap)
        else:
            self._bucket.rate = cap

    def succeeded(self) -> None:
        if self._bucket is not None:
            grown = self._bucket.rate + 1.0 / self._bucket.rate
            self._bucket.rate = min(grown, self.ceiling) if self.ceiling else grown


class _NoCookies(http.cookiejar.CookieJar):
    """Cookies a server or a proxy sets are not kept: the endpoint takes Basic auth on every
    request, and httpx would otherwise parse every answer's headers for them."""

    def extract_cookies(self, response: object, request: object) -> None:
        return None


def _proxy_set() -> bool:
    """Whether the environment names a proxy for http or https (NO_PROXY alone does not)."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def basic_auth(username: str, password: str) -> str:
    """An Authorization header's value, as httpx.BasicAuth makes it."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


class Sender(Protocol):
    """One worker's way to the endpoint."""

    resent: int
    """Requests sent again at once on a new connection: a kept one ended without an answer."""

    async def put(self, url: str, body: bytes) -> Reply: ...

    async def aclose(self) -> None: ...


class DirectSender:
    """Requests handed straight to an httpx transport the Deliverer was given (such as
    httpx.MockTransport), without httpx.AsyncClient: redirects are not followed, cookies
    not kept, and the Authorization header is the same every time, as with Http11Sender."""

    resent = 0

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        headers: dict[str, str],
        timeout: httpx.Timeout,
        bound: int,
    ) -> None:
        self._transport = transport
        self._headers = headers
        self._extensions = {"timeout": timeout.as_dict()}
        self._bound = bound

    async def put(self, url: str, body: bytes) -> Reply:
        request = httpx.Request(
            "PUT", url, headers=self._headers, content=body, extensions=self._extensions
        )
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            return (
                response.status_code,
                response.headers,
                await _read_bounded(response, self._bound),
            )
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()


class ClientSender:
    """Requests through httpx.AsyncClient, which sets up the proxies of the environment."""

    resent = 0

    def __init__(self, client: httpx.AsyncClient, bound: int) -> None:
        self._client = client
        self._bound = bound

    async def put(self, url: str, body: bytes) -> Reply:
        async with self._client.stream("PUT", url, content=body) as response:
            try:
                content = await _read_bounded(response, self._bound)
            except httpx.DecodingError:
                if response.is_success:
                    raise
                content = b""  # an error answer is told by its status (as Http11Sender does)
            return response.status_code, response.headers, content

    async def aclose(self) -> None:
        await self._client.aclose()


async def _read_bounded(response: httpx.Response, bound: int) -> bytes | None:
    """The body, or None once it exceeds the bound: never read a huge answer whole."""
    parts = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > bound:
            return None
        parts.append(part)
    return b"".join(parts)


Progress = Callable[[int, int], None]
"""Called with (accepted, failed) as outcomes are recorded."""


class Deliverer:
    """Sends the ledger's pending messages and records every outcome in it."""

    def __init__(
        self,
        *,
        config: Config,
        ledger: Ledger,
        base_url: str,
        credentials: tuple[str, str] | None,
        progress: Progress | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        stats: DeliveryStats | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self.stats = stats if stats is not None else DeliveryStats()
        self.max_bytes = config.max_request_bytes
        # The smallest body size a 413 has refused: a lone message this large cannot go.
        self._refused_size = config.max_request_bytes + 1
        self.envelope = Envelope(config.callback_url)
        self._progress = progress or (lambda accepted, failed: None)
        self._transport = transport
        self._backoff = Backoff(base=config.backoff_base, cap=config.backoff_cap)
        self._stopping = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._hurried = False
        self._resume_at = 0.0
        self._limit = AdaptiveLimit(config.concurrency)
        self._rate = AdaptiveRate(config.rate)
        # One TLS context for every worker's client: building one costs tens of ms.
        self._tls = self._verify() if transport is None else None
        if transport is None and _proxy_set():
            self._new_sender()  # a proxy httpx cannot use is told now, before any reading

    def stop(self) -> None:
        """Take no new work; requests in flight settle and are recorded."""
        self._stopping.set()

    def hurry(self) -> None:
        """Stop, and abandon the requests in flight: no answer is waited for, and their
        messages stay unsent as far as the ledger knows (the platform may have stored them:
        sent again later, they are known to it by sourceUuid)."""
        self.stop()
        self._hurried = True
        self.stats.abandoned = self._limit.in_flight > 0
        for worker in self._workers:
            worker.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> DeliveryStats:
        keys = self.ledger.keys()
        key_chunks = (self._chunks_of(*key) for key in keys)
        units: Iterator[Iterator[Chunk]]
        if self.config.unordered:
            units = (iter((c,)) for c in itertools.chain.from_iterable(key_chunks))
        else:
            units = key_chunks
        # In order, one worker per customer at most; unordered, chunks are shared out.
        workers = self.config.concurrency
        if not self.config.unordered:
            workers = min(workers, max(len(keys), 1))
        async with contextlib.AsyncExitStack() as stack:
            senders = [self._new_sender() for _ in range(workers)]
            for sender in senders:
                stack.push_async_callback(sender.aclose)
            self._workers = [
                asyncio.ensure_future(self._worker(units, sender)) for sender in senders
            ]
            try:
                await asyncio.gather(*self._workers)
            except asyncio.CancelledError:
                if not self._hurried:
                    raise
                await asyncio.wait(self._workers)  # each one's cancellation run to its end
            for worker in self._workers:
                # One stopped by an error before the others were cancelled: the run's error.
                error = None if worker.cancelled() else worker.exception()
                if error is not None:
                    raise error
        self.stats.reconnects = sum(sender.resent for sender in senders)
        self.stats.final_concurrency = self._limit.current
        return self.stats

    def _new_sender(self) -> Sender:
        """A worker's own way to the endpoint, with one connection: a shared pool scans all
        of its connections on every request and every answer (encode/httpx#3215), a cost
        that grows with the concurrency for no gain, as a worker has one request in flight.
        Http11Sender, unless a proxy is set (httpx honours proxy settings only for the
        transports its client builds) or the Deliverer was given a transport."""
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"histimport/{__version__}",
        }
        timeout = httpx.Timeout(self.config.timeout)
        bound = self.config.max_response_bytes
        direct = self._transport is not None or not _proxy_set()
        if direct and self.credentials is not None:
            headers["Authorization"] = basic_auth(*self.credentials)
        if self._transport is not None:
            return DirectSender(self._transport, headers, timeout, bound)
        if direct:
            return Http11Sender(headers, timeout, bound, ssl_context=self._tls)
        try:
            client = httpx.AsyncClient(
                auth=httpx.BasicAuth(*self.credentials) if self.credentials is not None else None,
                verify=self._tls or True,
                timeout=timeout,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                follow_redirects=False,
                cookies=_NoCookies(),
                headers=headers,
            )
        except (ImportError, ValueError, httpx.InvalidURL) as exc:
            # A SOCKS proxy (httpx needs socksio for it) or a proxy URL httpx cannot use.
            raise UsageError(
                f"the proxy set in the environment cannot be used: {exc}",
                hint="set HTTPS_PROXY / HTTP_PROXY / ALL_PROXY to an http:// or https:// "
                "proxy, or NO_PROXY for the platform's host",
            ) from exc
        return ClientSender(client, bound)

    def _verify(self) -> ssl.SSLContext:
        """TLS verification is always on; --ca-bundle adds a corporate CA to the usual ones."""
        plain = self.base_url.startswith("http://") and self.config.ca_bundle is None
        if plain and not _proxy_set():
            # No TLS can happen (redirects are not followed, no proxy is set): spare loading
            # the CAs (about 30 ms). Should one happen after all, it fails verification.
            return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context = httpx.create_ssl_context()
        if self.config.ca_bundle is not None:
            try:
                context.load_verify_locations(cafile=str(self.config.ca_bundle))
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"--ca-bundle {self.config.ca_bundle}: {exc}") from exc
        return context

    def _chunks_of(self, key_id: int, department: str, customer: str) -> Iterator[Chunk]:
        return chunks(
            department,
            customer,
            self._pending(key_id),
            chunk_size=self.config.chunk_size,
            max_bytes=lambda: self.max_bytes,
            envelope=self.envelope,
        )

    def _pending(self, key_id: int) -> Iterator[Pending]:
        after = 0
        page = max(self.config.chunk_size * 2, 200)
        while True:
            batch = self.ledger.pending(key_id, after, page)
            yield from batch
            if len(batch) < page:
                return  # a short page is the last: no query to learn that nothing is left
            after = batch[-1].id

    async def _worker(self, units: Iterator[Iterator[Chunk]], sender: Sender) -> None:
        for unit in units:
            for chunk in unit:
                if self.stopping:
                    return
                if not await self._send(chunk, sender) and not self.config.unordered:
                    if not self.stopping:
                        self._hold_back(unit)
                    break

    async def _send(self, chunk: Chunk, sender: Sender) -> bool:
        """Send one chunk until it has a final outcome, or the run stops. True when the
        customer's next chunk may follow: nothing of this one is left to send again."""
        attempt = throttled = 0
        while not self.stopping:
            size = self.envelope.size(chunk.messages)
            if len(chunk.messages) == 1 and size >= self._refused_size:
                description = f"a request of {size} bytes with this message alone was refused (413)"
                self._fail(chunk, Decision(Action.FAIL, 413, "MESSAGE_TOO_LARGE", description))
                return True
            await self._pace()
            if self.stopping:
                return False
            await self._limit.acquire()
            if self.stopping:  # stopped while it waited for its turn: nothing more goes out
                await self._limit.release(pressure=False)
                return False
            if attempt == throttled == 0:
                self.ledger.mark_in_flight(chunk.messages)
            decision = Decision(Action.RETRY)
            try:
                decision = await self._request(chunk, sender)
            finally:
                await self._limit.release(pressure=decision.backpressure)
            if decision.action is Action.ACCEPT:
                assert decision.body is not None and decision.status is not None
                self.stats.server_warnings += server_warnings(decision.body)
                self._rate.succeeded()
                outcomes = settle(chunk.messages, decision.status, decision.body)
                self._record(outcomes)
                return not any(o.retryable for o in outcomes)
            if decision.action is Action.ABORT:
                self.stats.aborted = decision.description
                self.stop()
                return False
            if decision.action is Action.SPLIT:
                return await self._split(chunk, decision, sender)
            if decision.action is Action.FAIL:
                self._fail(chunk, decision)
                return True
            if decision.unknown_outcome:
                self.stats.unknown_outcomes += 1
            paced = decision.status == 429
            throttled += paced
            attempt += not paced
            if attempt >= self.config.max_attempts or throttled >= _THROTTLE_ATTEMPTS:
                self._fail(chunk, decision, retryable=True)
                return False
            self.stats.retries += 1
            if decision.backpressure:
                # Everyone pauses: for as long as the server asked, or a short breather
                # (the growing backoff is this chunk's own, not the whole run's). Only a 429
                # speaks of the rate; a 503 may be any overload.
                if paced:
                    self._rate.pushed_back()
                pause = self._backoff.delay(0, decision.retry_after)
                self._resume_at = max(self._resume_at, time.monotonic() + pause)
            await self._sleep(self._backoff.delay(max(attempt, throttled), decision.retry_after))
        return False

    async def _split(self, chunk: Chunk, decision: Decision, sender: Sender) -> bool:
        """413: the body was too large for someone on the way. Send both halves in order,
        and remember the lower limit for the rest of the run."""
        if len(chunk.messages) == 1:
            self._fail(chunk, decision)
            return True
        self.stats.splits += 1
        size = self.envelope.size(chunk.messages)
        self._refused_size = min(self._refused_size, size)
        self.max_bytes = min(self.max_bytes, max(size // 2, 256))
        first, second = chunk.halves()
        if not await self._send(first, sender):
            if not self.stopping:
                self._hold_back([second])
            return False
        return await self._send(second, sender)

    def _hold_back(self, chunks: Iterable[Chunk]) -> None:
        """A customer whose chunk may still be sent again keeps the rest of its messages
        back, so that a later run or `retry` stores them after it, in order."""
        error = {
            "errorCode": "HELD_BACK",
            "errorDescription": "not sent, to keep the customer's order: an earlier message "
            "of this customer failed and may be sent again",
        }
        for chunk in chunks:
            held = [
                Outcome(m.id, m.source_uuid, State.PENDING, None, True, (error,))
                for m in chunk.messages
            ]
            self._record(held)

    async def _request(self, chunk: Chunk, sender: Sender) -> Decision:
        url = (
            f"{self.base_url}/department/{chunk.department}"
            f"/customer/{chunk.customer}/communication/historical"
        )
        self.stats.requests += 1
        try:
            # --timeout bounds connecting, then each read and write, and the whole request
            # at twice it (a connection made, then the answer): an answer that trickles in
            # cannot hold the customer back forever, and a connection that cannot be made
            # is told by its own, shorter bound (nothing was sent).
            async with asyncio.timeout(2 * self.config.timeout):
                status, headers, content = await sender.put(url, self.envelope.body(chunk.messages))
        except TimeoutError:
            self.stats.statuses["error"] += 1
            return classify_error(
                httpx.ReadTimeout(
                    f"no whole answer within twice --timeout ({2 * self.config.timeout:g} s)"
                )
            )
        except httpx.RequestError as exc:
            self.stats.statuses["error"] += 1
            return classify_error(exc)
        self.stats.statuses[str(status)] += 1
        if content is None and not 200 <= status < 300:
            # An error's body only describes it: the status decides (a 401 still stops).
            return classify(status, headers, b"", time.time())
        if content is None:
            return Decision(
                Action.RETRY,
                status,
                "RESPONSE_TOO_LARGE",
                f"the answer exceeded {self.config.max_response_bytes} bytes and was cut off",
                unknown_outcome=True,
            )
        return classify(status, headers, content, time.time())

    async def _pace(self) -> None:
        """Wait out a global pause (a 429 or 503 anywhere pauses everyone), then the rate."""
        while (delay := self._resume_at - time.monotonic()) > 0 and not self.stopping:
            await self._sleep(delay)
        await self._rate.take()

    async def _sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    def _fail(self, chunk: Chunk, decision: Decision, *, retryable: bool = False) -> None:
        errors = decision.as_errors()
        self._record(
            [
                Outcome(m.id, m.source_uuid, State.FAILED, decision.status, retryable, errors)
                for m in chunk.messages
            ]
        )

    def _record(self, outcomes: list[Outcome]) -> None:
        # A commit of one request's outcomes takes well under a millisecond; a writer thread
        # was tried and cost more in contention for the GIL than it saved.
        self.ledger.record(outcomes)
        accepted = sum(1 for o in outcomes if o.state is State.ACCEPTED)
        self._progress(accepted, len(outcomes) - accepted)
