"""Delivering chunks as they are handed on: one retry policy, requests paced to the rate
the platform accepts (`pace`), and a run that gives up on a platform that stays dead.

One request is in flight per customer (unless `unordered`): a customer's next chunk waits
for the final outcome of the previous one, through retries and splits, so the platform
stores each customer's history in file order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from . import __version__
from .batch import Chunk, Envelope, chunks
from .config import Config
from .errors import UsageError
from .ledger import Ledger
from .pace import Pacer, PaceState
from .policy import (
    Action,
    Backoff,
    Decision,
    classify,
    classify_error,
    outcomes_of,
    server_warnings,
    warning_excerpt,
)
from .records import Outcome, Pending, State
from .transport import Sender, SendError, proxies_set, unusable_proxy

# A 429 is the server (or a proxy) pacing us, not failing: it draws on its own, larger
# budget, so that a rate limit never makes the tool give up on a healthy message.
_THROTTLE_ATTEMPTS = 50
# Workers per request in flight: a worker whose chunk waits out a Retry-After holds no
# slot, and another customer's chunk takes it.
_WORKERS_PER_SLOT = 4
# Before the platform has answered anything, a connection that cannot be made is most
# likely a wrong URL: the run gives up after this many seconds, not --give-up-after.
FIRST_CONTACT_SECONDS = 10.0
WARNINGS_LISTED = 1000
"""The platform's warnings a report lists one by one at most (all are counted by code)."""
_WATCH_EVERY = 0.25
_PRUNE_EVERY = 2.0
"""Seconds between two prunings of the journal's settled rows."""


@dataclass
class DeliveryStats:
    """What the delivery did, for the report and the summary."""

    requests: int = 0
    retries: int = 0
    unknown_outcomes: int = 0
    splits: int = 0
    reconnects: int = 0
    warning_codes: Counter[str] = field(default_factory=Counter)  # the platform's, by code
    warnings_listed: list[dict[str, Any]] = field(default_factory=list)  # the first ones
    abandoned: bool = False  # a second Ctrl-C abandoned requests in flight
    statuses: Counter[str] = field(default_factory=Counter)
    final_concurrency: int = 0
    aborted: str | None = None
    gave_up: str | None = None  # why the run stopped waiting for a dead platform
    push_backs: Counter[str] = field(default_factory=Counter)  # by cause: "429", "503 ..."
    paused_seconds: float = 0.0  # waits of requests the platform pushed back, summed
    pace: PaceState = field(default_factory=lambda: PaceState(None, None))
    peak_rate: float | None = None


@dataclass(frozen=True, slots=True)
class Pause:
    """A request the platform pushed back, for the display and the logs."""

    cause: str  # "429", "429 Retry-After: 1", "503"
    wait: float  # seconds this request waits before it is sent again
    rate: float | None  # requests per second the run now paces at (None: unpaced)


class Health:
    """Whether the platform is alive. Given up on when nothing but connection errors,
    timeouts and 5xx came back for `give_up_after` seconds (`first_contact` while it has
    never answered), counted from the first of those failures, and from at least two
    customers: one customer's failures (a poisoned message, a department that fails) are
    its own. Any other answer, a 429 or a 404 included, shows the platform alive."""

    def __init__(self, give_up_after: float, first_contact: float) -> None:
        self.give_up_after = give_up_after
        self.first_contact = min(first_contact, give_up_after)
        self.answered = False
        self._failing_since: float | None = None  # monotonic
        self._failing_keys: set[tuple[str, str]] = set()
        self._last_error = ""

    def alive(self) -> None:
        self.answered = True
        self._failing_since = None
        self._failing_keys.clear()

    def failing(self, now: float, key: tuple[str, str], error: str, *, answered: bool) -> None:
        self.answered = self.answered or answered
        if self._failing_since is None:
            self._failing_since = now
        if len(self._failing_keys) < 2:
            self._failing_keys.add(key)
        self._last_error = error

    def verdict(self, now: float) -> str | None:
        """Why to give up, or None."""
        if self._failing_since is None or len(self._failing_keys) < 2:
            return None
        window = self.give_up_after if self.answered else self.first_contact
        if now - self._failing_since < window:
            return None
        began = time.time() - (now - self._failing_since)
        since = datetime.fromtimestamp(began, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.answered:
            what = f"failing since {since}, for {window:g} s (--give-up-after)"
        else:
            what = f"unreachable since {since}, for {window:g} s, and never answered"
        return f"the platform was {what}: last error {self._last_error}"


class Slots:
    """The senders, one per request in flight, handed out in the order they were asked
    for. (An asyncio.Queue would let a worker that just gave one back take it again before
    the worker it woke runs: that one's customer could wait for ever.)"""

    def __init__(self, senders: Iterable[Sender]) -> None:
        self._free = list(senders)
        self._waiting: deque[asyncio.Future[Sender]] = deque()

    async def take(self) -> Sender:
        if self._free and not self._waiting:
            return self._free.pop()
        waiter: asyncio.Future[Sender] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(waiter.result())  # handed over just as it was cancelled
            elif waiter in self._waiting:  # `give` may have passed over it already
                self._waiting.remove(waiter)
            raise

    def give(self, sender: Sender) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(sender)
                return
        self._free.append(sender)


Key = Hashable


class Lanes:
    """The chunks handed on and not yet sent, a lane per customer in the order they came
    (a lane per chunk, `unordered`). A worker takes a lane and sends its chunks one after
    another; another worker takes it up only once it is given back. Used in the event
    loop's thread; `put` and `close` come from elsewhere through `call_soon_threadsafe`."""

    def __init__(self, *, ordered: bool = True) -> None:
        self._ordered = ordered
        self._lanes: dict[Key, deque[Chunk]] = {}
        self._ready: deque[Key] = deque()
        self._taken: set[Key] = set()
        self._held_back: set[Key] = set()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._count = itertools.count()
        self.on_done: Callable[[Chunk], None] = lambda chunk: None
        """Called once for every chunk put, when it is done with (sent, held back...)."""
        self.on_held: Callable[[Chunk], None] = lambda chunk: None
        """Called for a chunk of a customer held back: its messages are recorded so."""

    def put(self, chunk: Chunk) -> None:
        key: Key = (chunk.department, chunk.customer) if self._ordered else next(self._count)
        if key in self._held_back:
            self.on_held(chunk)
            self.on_done(chunk)
            return
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = deque()
            if key not in self._taken:
                self._ready.append(key)
                self._wake()
        lane.append(chunk)

    def close(self) -> None:
        """Nothing more is put: workers stop once the lanes are empty."""
        self._closed = True
        while self._waiting:
            self._wake()

    async def take(self) -> Key | None:
        """A lane with chunks to send, for this worker alone until `give_back`; None once
        closed and empty."""
        while not self._ready:
            if self._closed:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
        key = self._ready.popleft()
        self._taken.add(key)
        return key

    def next(self, key: Key) -> Chunk | None:
        """The lane's next chunk; None when it has none left (it is given back)."""
        lane = self._lanes.get(key)
        if not lane:
            self._lanes.pop(key, None)
            self._taken.discard(key)
            return None
        return lane.popleft()

    def hold_back(self, key: Key) -> list[Chunk]:
        """The customer's chunks not sent yet, and those still to come, are held back: its
        earlier chunk failed and may be sent again."""
        self._held_back.add(key)
        return list(self._lanes.pop(key, ()))

    def abandon(self) -> list[Chunk]:
        """The run stops: every chunk not taken yet."""
        left = [chunk for lane in self._lanes.values() for chunk in lane]
        self._lanes.clear()
        self._ready.clear()
        return left

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


Progress = Callable[[int, int], None]
"""Called with (accepted, failed) as outcomes are recorded."""
Paused = Callable[[Pause], None]
"""Called for each request the platform pushes back."""
Noticed = Callable[[str, int, dict[str, Any]], None]
"""An event for the logs, at once: its name, its logging level, its fields."""


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
        paused: Paused | None = None,
        noticed: Noticed | None = None,
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
        self._paused = paused or (lambda pause: None)
        self._noticed = noticed or (lambda event, level, fields: None)
        self._transport = transport
        self._backoff = Backoff(base=config.backoff_base, cap=config.backoff_cap)
        self._stopping = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._hurried = False
        self._in_flight = 0
        self._marks: set[int] = set()  # the journal's marks of the requests in flight
        self._health = Health(config.give_up_after, FIRST_CONTACT_SECONDS)
        self.pacer = Pacer(config.rate)
        # One TLS context for every sender: building one costs tens of ms.
        self._tls = self._verify() if transport is None else None
        if transport is None and (unusable := unusable_proxy()) is not None:
            # Told now, before anything is read.
            raise UsageError(
                f"the proxy set in the environment cannot be used: {unusable}",
                hint="set HTTPS_PROXY / HTTP_PROXY / ALL_PROXY to an http:// or https:// "
                "proxy, or NO_PROXY for the platform's host",
            )
        self._slots = Slots(())

    def stop(self) -> None:
        """Take no new work; requests in flight settle and are recorded."""
        self._stopping.set()

    def hurry(self) -> None:
        """Stop, and abandon the requests in flight: no answer is waited for, and their
        messages stay unsent as far as the ledger knows (the platform may have stored them:
        sent again later, they are known to it by sourceUuid)."""
        self.stop()
        self._hurried = True
        self.stats.abandoned = self._in_flight > 0
        for worker in self._workers:
            worker.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self, lanes: Lanes) -> DeliveryStats:
        """Send the chunks put in `lanes` until it is closed and empty, or the run stops;
        what is left in it then is not sent (the ledger knows it as pending)."""
        workers = self.config.concurrency * _WORKERS_PER_SLOT
        lanes.on_held = lambda chunk: self._hold_back((chunk,))
        async with contextlib.AsyncExitStack() as stack:
            # One sender (one connection) per request in flight, taken with the slot.
            senders = [self._new_sender() for _ in range(self.config.concurrency)]
            for sender in senders:
                stack.push_async_callback(sender.aclose)
            self._slots = Slots(senders)
            self._workers = [asyncio.ensure_future(self._worker(lanes)) for _ in range(workers)]
            watch = asyncio.ensure_future(self._watch())
            try:
                await asyncio.gather(*self._workers)
            except asyncio.CancelledError:
                if not self._hurried:
                    raise
                await asyncio.wait(self._workers)  # each one's cancellation run to its end
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch  # an error of its own is raised here
                self.stats.pace = self.pacer.state
                self.stats.peak_rate = self.pacer.peak
                for chunk in lanes.abandon():
                    lanes.on_done(chunk)
            for worker in self._workers:
                # One stopped by an error before the others were cancelled: the run's error.
                error = None if worker.cancelled() else worker.exception()
                if error is not None:
                    raise error
        self.stats.reconnects = sum(sender.resent for sender in senders)
        self.stats.final_concurrency = self.config.concurrency
        return self.stats

    async def _watch(self) -> None:
        """Give up on a platform that stays dead: no new request leaves, and what is in
        flight settles."""
        pruned = time.monotonic()
        while not self.stopping:
            await self._sleep(_WATCH_EVERY)
            if time.monotonic() - pruned >= _PRUNE_EVERY:
                self.ledger.prune_journal(min(self._marks, default=None))
                pruned = time.monotonic()
            verdict = self._health.verdict(time.monotonic())
            if verdict is not None:
                self.stats.gave_up = verdict
                self._noticed("platform-down", logging.ERROR, {"reason": verdict})
                self.stop()

    async def first_contact(
        self, department: str, customer: str, message: Pending
    ) -> Outcome | None:
        """Send one message alone, before anything else is read: its answer tells at once
        whether the credentials, the base URL, TLS and the proxy are right. Refused for
        good (401, 403, TLS, a proxy), or no connection made for FIRST_CONTACT_SECONDS,
        the run stops (`stopping`). Otherwise the message's outcome, when the answer gave
        one; None when the run is to send it again with the others (a 5xx, a 429, a 413)."""
        # Bounded by the first-contact wait: an address that drops packets is no answer.
        sender = self._new_sender(timeout=min(self.config.timeout, FIRST_CONTACT_SECONDS))
        chunk = Chunk(department, customer, (message,))
        started = time.monotonic()
        try:
            for attempt in itertools.count(1):
                decision = await self._request(chunk, sender)
                # Its health only: sent outside the pace, it says nothing of the rate.
                self._judge_health(decision, (department, customer))
                if decision.action is Action.ACCEPT:
                    (outcome,) = self._accepted(chunk, decision)
                    return outcome
                if decision.action is Action.FAIL:
                    (outcome,) = self._outcomes(chunk, decision, State.FAILED)
                    return outcome
                if decision.action is Action.ABORT:
                    self._abort(decision)
                    return None
                waited = time.monotonic() - started
                if decision.status is not None or decision.unknown_outcome:
                    return None  # answered, or sent and perhaps stored: it goes again later
                if waited >= FIRST_CONTACT_SECONDS:
                    self.stats.gave_up = (
                        f"the platform could not be reached at {self.base_url} "
                        f"({decision.description}); check --base-url and the network"
                    )
                    self._noticed("platform-down", logging.ERROR, {"reason": self.stats.gave_up})
                    self.stop()
                    return None
                await asyncio.sleep(
                    min(self._backoff.delay(attempt), FIRST_CONTACT_SECONDS - waited)
                )
        finally:
            await sender.aclose()
        raise AssertionError("unreachable")  # pragma: no cover

    def _new_sender(self, timeout: float | None = None) -> Sender:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"histimport/{__version__}",
        }
        return Sender(
            headers=headers,
            timeout=self.config.timeout if timeout is None else timeout,
            bound=self.config.max_response_bytes,
            auth=self.credentials,
            verify=self._tls or True,
            transport=self._transport,
        )

    def _verify(self) -> ssl.SSLContext:
        """TLS verification is always on; --ca-bundle adds a corporate CA to the usual ones."""
        plain = self.base_url.startswith("http://") and self.config.ca_bundle is None
        if plain and not proxies_set():
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

    async def _worker(self, lanes: Lanes) -> None:
        while not self.stopping and (key := await self._next_lane(lanes)) is not None:
            while (chunk := lanes.next(key)) is not None:
                try:
                    if self.stopping:
                        continue  # left pending, as the ledger knows it
                    sent = await self._send(chunk)
                    if not (sent or self.config.unordered or self.stopping):
                        self._hold_back(lanes.hold_back(key), done=lanes.on_done)
                finally:
                    lanes.on_done(chunk)

    async def _next_lane(self, lanes: Lanes) -> Key | None:
        """A lane to send, or None once there are none left or the run stops."""
        take = asyncio.ensure_future(lanes.take())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((take, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not take.done():
                take.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await take
        return None if take.cancelled() else take.result()

    async def _send(self, chunk: Chunk) -> bool:
        """Send one chunk until it has a final outcome, or the run stops. True when the
        customer's next chunk may follow: nothing of this one is left to send again."""
        if len(chunk.messages) > 1 and self.envelope.size(chunk.messages) > self.max_bytes:
            # Cut before a 413 taught the lower limit: cut again, without a request.
            return await self._send_in_order(self._cut(chunk))
        marks: list[int] = []  # of this chunk in the journal, while it may be in flight
        try:
            return await self._attempts(chunk, marks)
        finally:
            self._marks.difference_update(marks)

    async def _attempts(self, chunk: Chunk, marks: list[int]) -> bool:
        attempt = throttled = 0
        last: Decision | None = None
        while not self.stopping:
            size = self.envelope.size(chunk.messages)
            if len(chunk.messages) == 1 and size >= self._refused_size:
                description = f"a request of {size} bytes with this message alone was refused (413)"
                self._fail(chunk, Decision(Action.FAIL, 413, "MESSAGE_TOO_LARGE", description))
                return True
            async with self._slot() as sender:
                await self._pace()
                if self.stopping:  # stopped while it waited for its turn: nothing more goes out
                    break
                if attempt == throttled == 0:
                    marks.append(self.ledger.mark_in_flight(chunk.messages))
                    self._marks.add(marks[-1])
                sent_at = time.monotonic()
                self._in_flight += 1
                try:
                    decision = await self._request(chunk, sender)
                finally:
                    self._in_flight -= 1
            self._heed(decision, sent_at, (chunk.department, chunk.customer))
            if decision.action is Action.ACCEPT:
                outcomes = self._accepted(chunk, decision)
                self._record(outcomes, (chunk.department, chunk.customer))
                return not any(o.retryable for o in outcomes)
            if decision.action is Action.ABORT:
                self._abort(decision)
                return False
            if decision.action is Action.SPLIT:
                return await self._split(chunk, decision)
            if decision.action is Action.FAIL:
                self._fail(chunk, decision)
                return True
            last = decision
            if decision.unknown_outcome:
                self.stats.unknown_outcomes += 1
            paced = decision.status == 429
            throttled += paced
            attempt += not paced
            if attempt >= self.config.max_attempts or throttled >= _THROTTLE_ATTEMPTS:
                self._fail(chunk, decision, retryable=True)
                self._noticed(
                    "gave-up",
                    logging.WARNING,
                    {**self._about(chunk, decision), "attempts": attempt + throttled},
                )
                return False
            self.stats.retries += 1
            wait = self._backoff.delay(max(attempt, throttled), decision.retry_after)
            if decision.backpressure:
                self._pushed_back(decision, wait)
            else:
                fields = {**self._about(chunk, decision), "attempt": attempt}
                self._noticed("retry", logging.INFO, {**fields, "waitSeconds": round(wait, 3)})
            await self._sleep(wait)
        if last is not None:
            # Stopped between two attempts: not sent, as far as the ledger knows, with the
            # error that the next attempt was waiting out.
            self._record(self._outcomes(chunk, last, State.PENDING, retryable=True))
        return False

    def _abort(self, decision: Decision) -> None:
        self.stats.aborted = decision.description
        self._noticed("aborted", logging.ERROR, {"reason": decision.description})
        self.stop()

    @staticmethod
    def _about(chunk: Chunk, decision: Decision) -> dict[str, Any]:
        """A request's fields in the logs: whose messages, how many, what came back."""
        return {
            "department": chunk.department,
            "customer": chunk.customer,
            "messages": len(chunk.messages),
            "status": decision.status,
            "cause": decision.description,
        }

    def live(self) -> dict[str, Any]:
        """The delivery's figures now, for the progress events."""
        pace = self.pacer.state
        return {
            "requests": self.stats.requests,
            "retries": self.stats.retries,
            "requestsInFlight": self._in_flight,
            "paceRequestsPerSecond": None if pace.rate is None else round(pace.rate, 1),
        }

    def _accepted(self, chunk: Chunk, decision: Decision) -> list[Outcome]:
        """The messages' outcomes in a 200 answer (its warnings counted)."""
        assert decision.body is not None and decision.status is not None
        stats = self.stats
        for source_uuid, code, warning in server_warnings(decision.body):
            stats.warning_codes[code] += 1
            if len(stats.warnings_listed) < WARNINGS_LISTED:
                stats.warnings_listed.append(
                    {
                        "sourceUuid": source_uuid,
                        "warningCode": code,
                        "warningDescription": warning_excerpt(warning),
                    }
                )
        return outcomes_of(chunk.messages, decision.status, decision.body)

    @staticmethod
    def _outcomes(
        chunk: Chunk, decision: Decision, state: State, *, retryable: bool = False
    ) -> list[Outcome]:
        """The same outcome for every message of the chunk, with the decision's errors."""
        errors = decision.as_errors()
        return [
            Outcome(m.id, m.source_uuid, state, decision.status, retryable, errors)
            for m in chunk.messages
        ]

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[Sender]:
        """One of the --concurrency requests in flight, and its sender."""
        sender = await self._slots.take()
        try:
            yield sender
        finally:
            self._slots.give(sender)

    def _heed(self, decision: Decision, sent_at: float, key: tuple[str, str]) -> None:
        """What an answer (or its lack) says of the platform: its pace, and its health."""
        now = time.monotonic()
        if decision.backpressure:
            self.pacer.refused(sent_at, now)
        elif decision.status is not None:
            self.pacer.accepted(sent_at, now)
        self._judge_health(decision, key)

    def _judge_health(self, decision: Decision, key: tuple[str, str]) -> None:
        status = decision.status
        if status is not None and status < 500:
            self._health.alive()
        elif decision.action is Action.RETRY:
            answered = status is not None
            self._health.failing(time.monotonic(), key, decision.description, answered=answered)

    def _pushed_back(self, decision: Decision, wait: float) -> None:
        cause = str(decision.status)
        if decision.retry_after is not None:
            cause += f" Retry-After: {decision.retry_after:g}"
        self.stats.push_backs[cause] += 1
        self.stats.paused_seconds += wait
        self._paused(Pause(cause, wait, self.pacer.rate))

    async def _split(self, chunk: Chunk, decision: Decision) -> bool:
        """413: the body was too large for someone on the way. Send both halves in order,
        and remember the lower limit for the rest of the run."""
        if len(chunk.messages) == 1:
            self._fail(chunk, decision)
            return True
        self.stats.splits += 1
        size = self.envelope.size(chunk.messages)
        self._refused_size = min(self._refused_size, size)
        self.max_bytes = min(self.max_bytes, max(size // 2, 256))
        return await self._send_in_order(chunk.halves())

    async def _send_in_order(self, pieces: Sequence[Chunk]) -> bool:
        """Send a chunk's pieces one after another; those after one that may be sent again
        are held back."""
        for n, piece in enumerate(pieces):
            if not await self._send(piece):
                if not self.stopping:
                    self._hold_back(pieces[n + 1 :])
                return False
        return True

    def _cut(self, chunk: Chunk) -> list[Chunk]:
        return list(
            chunks(
                chunk.department,
                chunk.customer,
                iter(chunk.messages),
                chunk_size=len(chunk.messages),
                max_bytes=lambda: self.max_bytes,
                envelope=self.envelope,
            )
        )

    def _hold_back(
        self, chunks: Iterable[Chunk], done: Callable[[Chunk], None] | None = None
    ) -> None:
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
            if done is not None:
                done(chunk)

    async def _request(self, chunk: Chunk, sender: Sender) -> Decision:
        url = (
            f"{self.base_url}/department/{chunk.department}"
            f"/customer/{chunk.customer}/communication/historical"
        )
        self.stats.requests += 1
        try:
            status, headers, content = await sender.put(url, self.envelope.body(chunk.messages))
        except SendError as exc:
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
        """Wait for this request's turn at the pace the platform accepts."""
        while not self.stopping:
            cuts = self.pacer.cuts
            wait = self.pacer.delay(time.monotonic())
            if wait <= 0:
                return
            await self._sleep(wait)
            if self.pacer.cuts == cuts:
                return  # else the rate was cut meanwhile: the turn taken is void

    async def _sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    def _fail(self, chunk: Chunk, decision: Decision, *, retryable: bool = False) -> None:
        self._record(self._outcomes(chunk, decision, State.FAILED, retryable=retryable))

    def _record(self, outcomes: list[Outcome], key: tuple[str, str] | None = None) -> None:
        # A commit of one request's outcomes takes well under a millisecond; a writer thread
        # was tried and cost more in contention for the GIL than it saved.
        self.ledger.record(outcomes, key)
        accepted = sum(1 for o in outcomes if o.state is State.ACCEPTED)
        self._progress(accepted, len(outcomes) - accepted)
