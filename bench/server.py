"""The benchmark's server: the bundled sandbox application (same routes, answers, latency and
429 rate limit as `histimport sandbox`), in its own process, with two additions.

    python bench/server.py [--latency MS] [--rate-limit N] [--rate-window bucket|fixed]
                           [--rate-burst N] [--no-retry-after] [--store memory|sqlite]

- `--store memory` (the default) keeps only the sourceUuids it accepted, in a dict, instead
  of writing every message to SQLite. The sandbox's SQLite store costs about 80 µs of server
  CPU per message, which on a small machine makes the server, not the client, the bottleneck
  at 0 and 20 ms. `--store sqlite` uses the sandbox's own store (a temporary file).
- `GET /_bench/window` answers when the first API request arrived and when the last API
  answer left (server clock), and how many answers were 200: the send phase as the server
  saw it, without the client's start-up and staging.

Prints `bench-server: serving URL` on stderr once it accepts connections; SIGTERM or Ctrl-C
stop it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from histimport.sandbox import (
    Outcome,
    SandboxApp,
    SandboxConfig,
    SandboxStore,
    SaveResult,
)
from histimport.sandbox.limits import LimiterShape
from histimport.sandbox.store import new_uuid, new_uuids

API_PREFIX = "/communications/"


class MemoryStore:
    """The part of `SandboxStore` the app uses, kept in memory: accepted sourceUuids only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted: dict[str, str] = {}
        self._seen: set[str] = set()
        self._receipts = 0
        self._repeats = 0

    def save(
        self,
        department: str,
        customer: str,
        messages: Sequence[object],
        *,
        reject: Any = None,
    ) -> list[SaveResult]:
        with self._lock:
            ids = [m.get("sourceUuid") if type(m) is dict else None for m in messages]
            if reject is None and _all_new(ids, self._seen):
                # Nearly every request: new, distinct sourceUuids, nothing to reject.
                self._receipts += len(ids)
                self._seen.update(ids)
                uuids = new_uuids(len(ids))
                self._accepted.update(zip(ids, uuids, strict=True))
                stored = Outcome.STORED
                return [SaveResult(stored, i, u) for i, u in zip(ids, uuids, strict=True)]
        return self._save(messages, reject)

    def _save(self, messages: Sequence[object], reject: Any) -> list[SaveResult]:
        results: list[SaveResult] = []
        with self._lock:
            for message in messages:
                self._receipts += 1
                source_uuid = message.get("sourceUuid") if isinstance(message, dict) else None
                if not isinstance(source_uuid, str) or not source_uuid:
                    results.append(
                        SaveResult(
                            Outcome.INVALID,
                            None,
                            error_code="MISSING_SOURCE_UUID",
                            problem="sourceUuid is required and must be a non-empty string",
                        )
                    )
                    continue
                if source_uuid in self._seen:
                    self._repeats += 1
                self._seen.add(source_uuid)
                known = self._accepted.get(source_uuid)
                if known is not None:
                    results.append(SaveResult(Outcome.DUPLICATE, source_uuid, message_uuid=known))
                elif reject is not None and reject(source_uuid):
                    results.append(SaveResult(Outcome.REJECTED, source_uuid))
                else:
                    message_uuid = new_uuid()
                    self._accepted[source_uuid] = message_uuid
                    results.append(
                        SaveResult(Outcome.STORED, source_uuid, message_uuid=message_uuid)
                    )
        return results

    def count(self) -> int:
        return len(self._accepted)

    def receipt_count(self) -> int:
        return self._receipts

    def duplicate_receipts(self) -> int:
        return self._repeats

    def messages(self, department: str | None = None, customer: str | None = None) -> list[Any]:
        return []  # bodies are not kept

    def close(self) -> None:
        pass


def _all_new(ids: list[Any], seen: set[str]) -> bool:
    """Whether every id is a non-empty string, none repeated, none seen before."""
    return (
        all(type(i) is str and i for i in ids)
        and len(set(ids)) == len(ids)
        and seen.isdisjoint(ids)
    )


class Timed:
    """ASGI wrapper noting the first API request's arrival and the last API answer's
    departure; serves them at GET /_bench/window."""

    def __init__(self, app: SandboxApp) -> None:
        self.app = app
        self.first: float | None = None
        self.last: float | None = None
        self.ok = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            if scope["type"] == "http" and scope["path"] == "/_bench/window":
                await self._window(send)
                return
            await self.app(scope, receive, send)
            return
        if self.first is None:
            self.first = time.monotonic()

        async def timed_send(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                self.ok += 1
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.last = time.monotonic()

        await self.app(scope, receive, timed_send)

    async def _window(self, send: Any) -> None:
        first, last = self.first, self.last
        seconds = last - first if first is not None and last is not None else None
        body = json.dumps({"seconds": seconds, "ok": self.ok, "first": first}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def listen(host: str) -> socket.socket:
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it
    # every answer after the first waits for a delayed ACK (as the sandbox does).
    family, kind, proto, _, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(512)
    return listener


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.0, help="milliseconds per answer")
    parser.add_argument("--rate-limit", type=float, default=None, help="requests per second")
    parser.add_argument("--rate-window", choices=("bucket", "fixed"), default="bucket")
    parser.add_argument("--rate-burst", type=float, default=None, help="the bucket's burst")
    parser.add_argument("--no-retry-after", action="store_true", help="bare 429s")
    parser.add_argument(
        "--fail-rate", type=float, default=0.0, help="share of requests answered 503"
    )
    parser.add_argument(
        "--error-rate", type=float, default=0.0, help="share answered 500 (after storing)"
    )
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument(
        "--username", help="require Basic auth: this user, with the password 'bench'"
    )
    args = parser.parse_args()

    config = SandboxConfig(
        host=args.host,
        port=0,
        latency_ms=args.latency,
        rate_limit=args.rate_limit,
        rate_window=LimiterShape(args.rate_window),
        rate_burst=args.rate_burst,
        rate_retry_after=not args.no_retry_after,
        fail_rate=args.fail_rate,
        error_after_store_rate=args.error_rate,
        username=args.username,
        password=None if args.username is None else "bench",
    )
    with tempfile.TemporaryDirectory(prefix="histimport-bench-") as tmp:
        store: Any = (
            MemoryStore() if args.store == "memory" else SandboxStore(Path(tmp) / "db.sqlite3")
        )
        app = Timed(SandboxApp(config, store))
        listener = listen(args.host)
        port = listener.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=args.host,
                port=port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        print(f"bench-server: serving http://{args.host}:{port}/communications", file=sys.stderr)
        sys.stderr.flush()
        try:
            server.run(sockets=[listener])
        finally:
            listener.close()
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
