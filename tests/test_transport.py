"""The asyncio transport under httpx: keep-alive, reconnection, httpx's errors, proxies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from histimport.config import Config
from histimport.deliver import ClientSender, Deliverer, DirectSender
from histimport.ledger import Ledger
from histimport.transport import AsyncioTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A raw server on loopback; yields its URL and a list that counts its connections."""
    connections: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", connections


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    return head + await reader.readexactly(length)


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(OK)
        await writer.drain()


def client(**options: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=AsyncioTransport(),
        timeout=httpx.Timeout(**options or {"timeout": 5}),
    )


def test_a_connection_is_kept_alive_between_requests() -> None:
    async def main() -> None:
        async with serving(answer_each) as (url, connections), client() as http:
            statuses = [(await http.put(f"{url}/x", content=b"[1]")).status_code for _ in range(5)]
            assert statuses == [200] * 5
            assert len(connections) == 1

    asyncio.run(main())


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive by default, and yet closed right after
        await writer.drain()

    async def main() -> None:
        async with serving(answer_once) as (url, connections), client() as http:
            for _ in range(3):
                response = await http.put(f"{url}/x", content=b"[1]")
                assert response.json() == {}
                await asyncio.sleep(0.05)  # the server's close arrives while idle
            assert len(connections) == 3

    asyncio.run(main())


def test_a_connection_the_server_wrote_to_while_idle_is_replaced() -> None:
    """A late answer on an idle connection (a 408 some proxies send at their idle timeout)
    is not taken as the next request's answer, nor does it fail it."""

    async def answer_then_time_out(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)  # and the connection stays open

    async def main() -> None:
        async with serving(answer_then_time_out) as (url, connections), client() as http:
            for _ in range(2):
                assert (await http.put(f"{url}/x", content=b"[1]")).status_code == 200
                await asyncio.sleep(0.2)
            assert len(connections) == 2

    asyncio.run(main())


def test_after_a_failed_request_and_on_another_server_a_new_connection_is_made() -> None:
    hung_up: list[int] = []

    async def hang_up_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not hung_up:
            hung_up.append(1)
            await read_request(reader)
            return
        await answer_each(reader, writer)

    async def main() -> None:
        async with (
            serving(hang_up_once) as (first, first_connections),
            serving(answer_each) as (second, second_connections),
            client() as http,
        ):
            with pytest.raises(httpx.RemoteProtocolError):
                await http.put(f"{first}/x", content=b"[1]")
            urls = [first, first, second, second, first]
            statuses = [(await http.put(f"{url}/x", content=b"[1]")).status_code for url in urls]
            assert statuses == [200] * 5
            # The failed one, then one per change of server.
            assert (len(first_connections), len(second_connections)) == (3, 1)

    asyncio.run(main())


def test_one_request_at_a_time() -> None:
    async def main() -> None:
        async with serving(answer_each) as (url, _), client() as http:
            async with http.stream("PUT", f"{url}/x", content=b"[1]"):
                with pytest.raises(RuntimeError, match="one request at a time"):
                    await http.put(f"{url}/x", content=b"[1]")
            assert (await http.put(f"{url}/x", content=b"[1]")).status_code == 200

    asyncio.run(main())


@pytest.mark.parametrize("misbehaviour", ["no answer", "hang up", "half a body", "not http"])
def test_what_goes_wrong_is_raised_as_httpx_own_transport_raises_it(misbehaviour: str) -> None:
    async def misbehave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if misbehaviour == "no answer":
            await asyncio.sleep(2)
        elif misbehaviour == "half a body":
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"a":')
        elif misbehaviour == "not http":
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async def outcome(http: httpx.AsyncClient, url: str) -> BaseException:
        with pytest.raises(httpx.TransportError) as raised:
            async with http.stream("PUT", f"{url}/x", content=b"[1]") as response:
                await response.aread()
        return raised.value

    async def main() -> None:
        async with serving(misbehave) as (url, _):
            async with client(timeout=0.3) as http:
                ours = await outcome(http, url)
            theirs_client = httpx.AsyncClient(timeout=0.3, trust_env=False)
            async with theirs_client as http:
                theirs = await outcome(http, url)
        assert type(ours) is type(theirs)
        if not isinstance(ours, httpx.TimeoutException):  # h11's words, both ways
            assert str(ours) == str(theirs)

    asyncio.run(main())


def test_a_refused_connection_is_a_connect_error() -> None:
    async def main() -> None:
        async with serving(read_request) as (url, _):
            pass  # closed: nothing listens on its port any more
        async with client() as http:
            with pytest.raises(httpx.ConnectError):
                await http.put(f"{url}/x", content=b"[1]")

    asyncio.run(main())


def test_no_proxy_alone_sends_straight_to_the_transport(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "internal.example")
    with Ledger(tmp_path / "state") as ledger:
        deliverer = Deliverer(
            config=Config(), ledger=ledger, base_url="http://platform.test", credentials=None
        )
        assert isinstance(deliverer._new_sender(), DirectSender)
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
        assert isinstance(deliverer._new_sender(), ClientSender)


def test_a_proxy_from_the_environment_is_still_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx reads proxy settings only for transports it builds: with one set, the run
    keeps httpx's own transport, and the request goes through the proxy."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await read_request(reader)).split(b"\r\n")[0])
        writer.write(OK)
        await writer.drain()

    async def main() -> None:
        async with serving(proxy) as (proxy_url, _):
            monkeypatch.setenv("HTTP_PROXY", proxy_url)
            for name in ("NO_PROXY", "no_proxy", "http_proxy"):
                monkeypatch.delenv(name, raising=False)
            with Ledger(tmp_path / "state") as ledger:
                deliverer = Deliverer(
                    config=Config(),
                    ledger=ledger,
                    base_url="http://platform.test",
                    credentials=None,
                )
                sender = deliverer._new_sender()
                try:
                    status, _, content = await sender.put("http://platform.test/x", b"[1]")
                finally:
                    await sender.aclose()
        assert (status, content) == (200, b"{}")
        assert seen == [b"PUT http://platform.test/x HTTP/1.1"]

    asyncio.run(main())
