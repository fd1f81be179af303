"""HTTP-CONNECT frontend: raw client sockets -> Unix socket or TCP+mTLS -> server -> agent -> endpoint.

Answers are compared byte for byte with what the Go proxy-server wrote in the interop
recording (tests/interop/client-http-connect.txt); every test ends with the server's and
the agent's tables empty and no HTTP connection left (see `http_connect_stack`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import socket
import ssl
import stat
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy_agent.config import AgentConfig
from proxy_common.certs import DemoPki, issue, make_ca, write_pair
from proxy_common.client import open_tunnel
from proxy_common.errors import ConfigError, DialFailure
from proxy_common.messages import CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse
from proxy_server import cli as server_cli
from proxy_server.config import ServerConfig
from tests.harness import (
    ROOT,
    Stack,
    assert_page,
    deterministic_chunks,
    echo_handler,
    endpoint,
    expected_sha256,
    http_handler,
    sized_sink,
    source_handler,
    wait_for,
)
from tests.http_connect_client import (
    RECORDED_TARGET,
    Access,
    blackhole,
    client_tls,
    connect,
    connect_request,
    http_connect_stack,
    http_connections,
    read_all,
    recorded,
    recorded_go_client_request,
    recorded_go_client_tunneled_get,
    settled,
    shut,
)
from tests.integration.test_interop_server import AGENT_MD, agent_stream, receive
from tests.unit import test_egress_selector_configs as egress_configs

pytestmark = pytest.mark.integration
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
BIG = 256 << 20
SHORT_HEADER_TIMEOUT = 0.5


@pytest.fixture(params=["uds", "tls"])
async def hc(request: pytest.FixtureRequest, pki: DemoPki, short_tmp: Path) -> AsyncIterator[tuple[Stack, Access]]:
    """An http-connect server on its Unix socket or on TCP+mTLS (no agent yet)."""
    async with http_connect_stack(pki, short_tmp, request.param) as running:
        yield running


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ happy paths
async def test_tunneled_http_get(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()
    async with endpoint(http_handler) as ep:
        reader, writer, head = await connect(access, ep.address)
        assert head == ESTABLISHED
        assert http_connections(stack) == 1
        writer.write(f"GET /success HTTP/1.1\r\nHost: {ep.address}\r\n\r\n".encode())
        response = await read_all(reader)
        assert_page(response)
        await shut(writer)


async def test_go_client_bytes_are_answered_as_the_go_server_does(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()
    async with endpoint(http_handler) as ep:
        request = recorded_go_client_request().replace(RECORDED_TARGET, ep.address.encode())
        reader, writer = await access.open()
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head == recorded("Success")
        # Nothing may follow the 200 before the client speaks (the Go client rejects it).
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        writer.write(recorded_go_client_tunneled_get())
        response = await read_all(reader)
        assert_page(response)
        await shut(writer)


async def test_bytes_pipelined_after_the_connect_head_are_forwarded(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()
    async with endpoint(http_handler) as ep:
        get = f"GET /pipelined HTTP/1.1\r\nHost: {ep.address}\r\n\r\n".encode()
        reader, writer, head = await connect(access, ep.address, early=get)
        assert head == ESTABLISHED
        assert (await read_all(reader)).endswith(b"hello from /pipelined</body></html>")
        await shut(writer)


@pytest.mark.slow  # in the default run on purpose; `-m "not slow"` skips it for a quick pass
async def test_256_mib_each_way_arrive_intact(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()
    async with endpoint(source_handler(BIG)) as source, endpoint(sized_sink) as sink:
        started = time.perf_counter()
        reader, writer, head = await connect(access, source.address)
        assert head == ESTABLISHED
        down, received = hashlib.sha256(), 0
        async with asyncio.timeout(60):
            while chunk := await reader.read(1 << 20):
                down.update(chunk)
                received += len(chunk)
        down_seconds = time.perf_counter() - started
        await shut(writer)
        assert received == BIG
        assert down.hexdigest() == expected_sha256(BIG)

        started = time.perf_counter()
        reader, writer, head = await connect(access, sink.address)
        assert head == ESTABLISHED
        writer.write(struct.pack("!Q", BIG))
        async with asyncio.timeout(60):
            for piece in deterministic_chunks(BIG, b"up"):
                writer.write(piece)
                await writer.drain()
            answer = await read_all(reader)
        up_seconds = time.perf_counter() - started
        await shut(writer)
        assert answer.decode() == expected_sha256(BIG, b"up")
    print(f"\n{access.kind}: down={BIG / down_seconds / 2**20:.0f} MiB/s up={BIG / up_seconds / 2**20:.0f} MiB/s")


async def test_100_concurrent_tunnels(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()
    async with endpoint(echo_handler) as ep:

        async def one(index: int) -> None:
            payload = hashlib.shake_256(str(index).encode()).digest(16 << 10)
            reader, writer, head = await connect(access, ep.address)
            assert head == ESTABLISHED
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 20) == payload
            await shut(writer)

        async with asyncio.TaskGroup() as group:
            for index in range(100):
                group.create_task(one(index), name=f"tunnel-{index}")
        assert ep.accepted == 100
        await wait_for(lambda: ep.open_connections == 0, what="endpoint connections closed")


# ------------------------------------------------------------------- dial errors
async def test_refused_dial_gets_the_reference_502(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()
    port = closed_port()
    reader, writer = await access.open()
    writer.write(connect_request(f"127.0.0.1:{port}"))
    answer = await read_all(reader)  # the server closes after the body
    await shut(writer)
    assert answer == recorded("Dial to a closed port").replace(b"18399", str(port).encode())
    assert stack.server.metrics.dial_failures.value(str(DialFailure.ERROR_RESPONSE)) == 1


async def test_target_without_port_gets_the_reference_502(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()
    reader, writer = await access.open()
    writer.write(b"CONNECT 127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = await read_all(reader)
    await shut(writer)
    assert answer == recorded("Target without a port")


async def test_no_agent_gets_the_reference_500(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    reader, writer = await access.open()
    writer.write(connect_request("127.0.0.1:18400", b"raw-python"))
    answer = await read_all(reader)
    await shut(writer)
    assert answer == recorded("No agent connected")
    assert answer == recorded("Agent stopped again")
    assert stack.server.metrics.dial_failures.value(str(DialFailure.NO_AGENT)) == 1


async def test_agent_dial_timeout_gets_504(pki: DemoPki, short_tmp: Path) -> None:
    """A target whose accept queue is full never completes the TCP handshake: the agent's
    own dial timeout fires and its `i/o timeout` text maps to 504."""
    async with http_connect_stack(pki, short_tmp, "uds") as (stack, access), blackhole() as port:
        await stack.add_agent(dial_timeout=0.3)
        reader, writer = await access.open()
        writer.write(connect_request(f"127.0.0.1:{port}"))
        answer = await read_all(reader)
        await shut(writer)
        body = f"dial tcp 127.0.0.1:{port}: i/o timeout".encode()
        assert answer == (
            b"HTTP/1.1 504 Gateway Timeout\r\nConnection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body
        )


async def test_backend_dial_timeout_gets_the_reference_504(pki: DemoPki, short_tmp: Path) -> None:
    """--backend-dial-timeout: the agent is still dialing when the server's own bound fires;
    the client gets the reference's 504 and the agent is told to drop the dial (DIAL_CLS)."""
    async with (
        http_connect_stack(pki, short_tmp, "uds", backend_dial_timeout=0.3) as (stack, access),
        blackhole() as port,
    ):
        agent = await stack.add_agent(dial_timeout=30)
        reader, writer = await access.open()
        writer.write(connect_request(f"127.0.0.1:{port}"))
        answer = await read_all(reader)
        await shut(writer)
        assert answer == (
            b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            b"Backend dial timeout: timed out waiting for backend dial\r\n"
        )
        assert stack.server.metrics.dial_failures.value(str(DialFailure.BACKEND_DIAL_TIMEOUT)) == 1
        await wait_for(lambda: agent.connection_count() == 0, what="the agent dropped the abandoned dial")


async def test_agent_lost_before_answering_gets_the_reference_502(pki: DemoPki, short_tmp: Path) -> None:
    async with http_connect_stack(pki, short_tmp, "uds") as (stack, access), blackhole() as port:
        agent = await stack.add_agent(dial_timeout=30)
        reader, writer = await access.open()
        writer.write(connect_request(f"127.0.0.1:{port}"))
        await wait_for(lambda: stack.server.router.pending_count == 1, what="dial pending at the agent")
        await agent.stop()
        answer = await read_all(reader)
        await shut(writer)
        assert answer == (
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            b"Backend context error: context canceled\r\n"
        )


# --------------------------------------------------------------- other requests
async def test_non_connect_gets_the_reference_405_and_keep_alive(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()
    reader, writer = await access.open()
    writer.write(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    body = await asyncio.wait_for(reader.readexactly(45), 10)
    date = re.compile(rb"Date: [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
    assert date.search(head)
    assert date.sub(b"Date: X", head + body) == date.sub(b"Date: X", recorded("Not a CONNECT request"))
    # The connection stays open: the next request on it is a CONNECT that works.
    async with endpoint(echo_handler) as ep:
        writer.write(connect_request(ep.address))
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == ESTABLISHED
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        await shut(writer)


async def test_malformed_request_gets_400_and_close(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    reader, writer = await access.open()
    writer.write(b"hello there\r\n\r\n")
    answer = await read_all(reader)
    await shut(writer)
    assert http_connections(stack) == 0 and not stack.server.board.frontends
    assert answer == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\n\r\n400 Bad Request"
    )


async def test_connect_without_host_is_served_as_go_serves_it(hc: tuple[Stack, Access]) -> None:
    """Go's net/http requires Host on HTTP/1.1 requests except CONNECT; pipelined bytes survive."""
    stack, access = hc
    await stack.add_agent()
    async with endpoint(http_handler) as ep:
        reader, writer = await access.open()
        writer.write(f"CONNECT {ep.address} HTTP/1.1\r\n\r\nGET /nohost HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == ESTABLISHED
        assert (await read_all(reader)).endswith(b"hello from /nohost</body></html>")
        await shut(writer)


async def test_get_without_host_gets_go_net_http_400(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    reader, writer = await access.open()
    writer.write(b"GET /x HTTP/1.1\r\n\r\n")
    answer = await read_all(reader)
    await shut(writer)
    assert answer == (
        b"HTTP/1.1 400 Bad Request: missing required Host header\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\n\r\n400 Bad Request: missing required Host header"
    )
    assert http_connections(stack) == 0


async def test_oversized_head_gets_431_and_close(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    reader, writer = await access.open()
    writer.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fill: " + b"a" * (2 << 20) + b"\r\n\r\n")
    answer = await read_all(reader)
    await shut(writer)
    assert answer == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\n\r\n431 Request Header Fields Too Large"
    )
    assert stack.server.router.is_empty()


@pytest.mark.parametrize("kind", ["uds", "tls"])
async def test_unfinished_head_is_closed_after_the_header_timeout(kind: str, pki: DemoPki, short_tmp: Path) -> None:
    async with http_connect_stack(pki, short_tmp, kind, frontend_header_timeout=SHORT_HEADER_TIMEOUT) as (
        stack,
        access,
    ):
        await stack.add_agent()
        reader, writer = await access.open()
        started = time.perf_counter()
        writer.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        assert await read_all(reader, timeout=10) == b""
        assert SHORT_HEADER_TIMEOUT <= time.perf_counter() - started < 5
        await shut(writer)
        assert not stack.server.board.frontends


@pytest.mark.parametrize(
    ("kind", "stage"), [("uds", "head"), ("tls", "head"), ("tls", "handshake")], ids=["uds", "tls", "tls-handshake"]
)
async def test_dribbling_client_is_closed_after_the_header_timeout(
    kind: str, stage: str, pki: DemoPki, short_tmp: Path
) -> None:
    """Slow loris: one byte every 50 ms never resets the bound; it covers the whole request
    head (or, on TLS, the whole handshake), not each read."""
    async with http_connect_stack(pki, short_tmp, kind, frontend_header_timeout=SHORT_HEADER_TIMEOUT) as (
        stack,
        access,
    ):
        if stage == "handshake":
            reader, writer = await access.open_raw()
            start, drip = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x00"  # a ClientHello, never finished
        else:
            reader, writer = await access.open()
            start, drip = b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", b"a"
        started = time.perf_counter()

        async def dribble() -> None:
            writer.write(start)
            for _ in range(200):  # 10 s at most; the server closes long before
                await asyncio.sleep(0.05)
                writer.write(drip)
                await writer.drain()

        dribbler = asyncio.create_task(dribble(), name="slow-loris")
        try:
            closed = await read_all(reader, timeout=10)
        except (ConnectionError, ssl.SSLError):
            closed = b""
        finally:
            dribbler.cancel()
            await asyncio.gather(dribbler, return_exceptions=True)
        elapsed = time.perf_counter() - started
        assert closed == b""
        assert SHORT_HEADER_TIMEOUT <= elapsed < 5, elapsed
        await shut(writer)
        assert not stack.server.board.frontends


@pytest.mark.parametrize("kind", ["uds", "tls"])
async def test_client_that_sends_nothing_is_closed(kind: str, pki: DemoPki, short_tmp: Path) -> None:
    """On TLS the silent client never even starts the handshake; the same bound applies."""
    async with http_connect_stack(pki, short_tmp, kind, frontend_header_timeout=SHORT_HEADER_TIMEOUT) as (
        _stack,
        access,
    ):
        reader, writer = await access.open_raw()
        started = time.perf_counter()
        assert await read_all(reader, timeout=10) == b""
        assert SHORT_HEADER_TIMEOUT <= time.perf_counter() - started < 5
        await shut(writer)


async def test_slow_client_does_not_hold_up_others(pki: DemoPki, short_tmp: Path) -> None:
    async with http_connect_stack(pki, short_tmp, "uds", frontend_header_timeout=SHORT_HEADER_TIMEOUT * 4) as (
        stack,
        access,
    ):
        await stack.add_agent()
        stalled = [await access.open() for _ in range(20)]
        for _, writer in stalled:
            writer.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")
        async with endpoint(echo_handler) as ep:
            reader, writer, head = await connect(access, ep.address)
            assert head == ESTABLISHED
            writer.write(b"through")
            assert await asyncio.wait_for(reader.readexactly(7), 5) == b"through"
            await shut(writer)
        for reader, writer in stalled:
            assert await read_all(reader, timeout=10) == b""
            await shut(writer)


# ------------------------------------------------------- against a raw Go-like agent
async def test_raw_agent_sees_the_reference_packets(hc: tuple[Stack, Access]) -> None:
    """What the agent sees and what the client gets, packet by packet (konnectivity-protocol.md
    3.4): DIAL_REQ for the CONNECT target, the 200 only after DIAL_RSP, client bytes (pipelined
    ones first) as DATA, agent DATA raw, client EOF -> CLOSE_REQ; agent DIAL_CLS -> the socket
    closes without a byte; agent CLOSE_RSP -> the client sees EOF."""
    stack, access = hc
    async with agent_stream(stack, AGENT_MD) as agent:
        await agent.call.initial_metadata()
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")

        reader, writer = await access.open()
        writer.write(connect_request("10.0.0.5:10250") + b"early")
        dial = await receive(agent)
        assert isinstance(dial, DialRequest) and (dial.address, dial.protocol) == ("10.0.0.5:10250", "tcp")
        assert 0 <= dial.dial_id < 1 << 63
        with pytest.raises(TimeoutError):  # nothing is answered before the agent's DIAL_RSP
            await asyncio.wait_for(reader.read(1), 0.2)
        await agent.send(DialResponse(dial.dial_id, conn_id=7))
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == ESTABLISHED
        assert await receive(agent) == Data(7, b"early")
        writer.write(b"more")
        assert await receive(agent) == Data(7, b"more")
        await agent.send(Data(7, b"reply"))
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"reply"
        await shut(writer)
        assert await receive(agent) == CloseRequest(7)
        await agent.send(CloseResponse(7))

        reader, writer = await access.open()
        writer.write(connect_request("10.0.0.5:10251"))
        dial = await receive(agent)
        assert isinstance(dial, DialRequest)
        await agent.send(CloseDial(dial.dial_id))
        assert await read_all(reader) == b""
        await shut(writer)

        reader, writer = await access.open()
        writer.write(connect_request("10.0.0.5:10252"))
        dial = await receive(agent)
        assert isinstance(dial, DialRequest)
        await agent.send(DialResponse(dial.dial_id, conn_id=8))
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == ESTABLISHED
        await agent.send(Data(8, b"last words"))
        await agent.send(CloseResponse(8))
        assert await read_all(reader) == b"last words"
        await shut(writer)
        await settled(stack)


# ------------------------------------------------------------------ tunnel ends
async def test_remote_close_ends_the_tunnel(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    await stack.add_agent()

    async def greet_and_leave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()

    async with endpoint(greet_and_leave) as ep:
        reader, writer, head = await connect(access, ep.address)
        assert head == ESTABLISHED
        assert await read_all(reader) == b"bye"
        await shut(writer)


async def test_client_close_releases_the_agent_connection(hc: tuple[Stack, Access]) -> None:
    stack, access = hc
    agent = await stack.add_agent()
    async with endpoint(echo_handler) as ep:
        reader, writer, head = await connect(access, ep.address)
        assert head == ESTABLISHED
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        assert agent.connection_count() == 1
        await shut(writer)
        await wait_for(lambda: ep.open_connections == 0, what="endpoint connection closed by the agent")
        await settled(stack)


async def test_client_that_stops_reading_does_not_hold_up_other_tunnels(pki: DemoPki, short_tmp: Path) -> None:
    """A client that never reads fills only its own buffer; another tunnel through the same
    agent keeps flowing (whether the agent's flow control stalls the idle one or the router
    cuts it off after overflow_wait), and closing the client releases everything."""
    async with http_connect_stack(pki, short_tmp, "uds", overflow_wait=0.5, frontend_buffer_bytes=256 << 10) as (
        stack,
        access,
    ):
        await stack.add_agent()
        async with endpoint(source_handler(1 << 30)) as source, endpoint(echo_handler) as echo:
            stalled_reader, stalled, head = await connect(access, source.address)
            assert head == ESTABLISHED
            assert await stalled_reader.readexactly(1 << 20)  # flowing; from here on never read
            await wait_for(lambda: _stuck_or_cut(stack), what="the idle tunnel's buffer full or the tunnel cut")
            reader, writer, head = await connect(access, echo.address)
            assert head == ESTABLISHED
            payload = os.urandom(4 << 20)
            writer.write(payload)
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 20) == payload
            await shut(writer)
            await shut(stalled)
            await wait_for(lambda: source.open_connections == 0, what="source released")


def _stuck_or_cut(stack: Stack) -> bool:
    links = list(stack.server.board.frontends.values())
    return not links or (len(links) == 1 and not links[0].mailbox.has_room())


def plain_agent() -> dict[str, Any]:
    """Agent settings for the reference protocol only (no per-connection streams), where
    the agent configuration offers the choice."""
    return {"flow_control": False} if "flow_control" in {f.name for f in dataclasses.fields(AgentConfig)} else {}


async def test_client_that_stops_reading_is_cut_off_with_a_plain_agent(pki: DemoPki, short_tmp: Path) -> None:
    """Agent DATA shares the agent's stream: the router gives up on the client after
    overflow_wait, and the writer stuck on the client's socket gives up too."""
    async with http_connect_stack(pki, short_tmp, "uds", overflow_wait=0.3, frontend_buffer_bytes=256 << 10) as (
        stack,
        access,
    ):
        await stack.add_agent(**plain_agent())
        async with endpoint(source_handler(1 << 30)) as ep:
            _reader, writer, head = await connect(access, ep.address)
            assert head == ESTABLISHED
            await wait_for(lambda: not stack.server.board.frontends, timeout=15, what="tunnel cut off")
            assert stack.server.metrics.overflow_closes._value.get() == 1
            await shut(writer)
            await wait_for(lambda: ep.open_connections == 0, what="endpoint released")


async def test_stop_closes_open_tunnels(pki: DemoPki, short_tmp: Path) -> None:
    stack = await Stack(pki, short_tmp, mode="http-connect").start()
    access = Access("uds", uds=stack.uds)
    try:
        await stack.add_agent()
        async with endpoint(echo_handler) as ep:
            reader, writer, head = await connect(access, ep.address)
            assert head == ESTABLISHED
            idle, idle_writer = await access.open()
            await stack.server.stop(0)
            assert await read_all(reader) == b""
            assert await read_all(idle) == b""
            assert not Path(stack.uds).exists()
            await shut(writer)
            await shut(idle_writer)
    finally:
        await stack.stop()


async def test_unix_socket_is_owner_only(pki: DemoPki, short_tmp: Path) -> None:
    async with http_connect_stack(pki, short_tmp, "uds") as (stack, _access):
        assert stat.S_IMODE(os.stat(stack.uds).st_mode) == 0o600


async def test_tcp_frontend_creates_no_socket_file(pki: DemoPki, short_tmp: Path) -> None:
    async with http_connect_stack(pki, short_tmp, "tls") as (stack, _access):
        assert stack.uds == "" and stack.server.frontend_port
        assert not list(short_tmp.glob("*.sock"))


# ---------------------------------------------------------------------- mTLS
async def _tls_refused(access: Access, context: ssl.SSLContext) -> tuple[str, BaseException | bytes]:
    """Try a CONNECT with `context`: ("handshake", error) if the handshake failed, else
    ("after", error or the bytes received until the server closed)."""
    try:
        reader, writer = await access.open(context)
    except (ssl.SSLError, ConnectionError) as exc:
        return "handshake", exc
    try:
        writer.write(connect_request("127.0.0.1:1"))
        return "after", await read_all(reader, timeout=10)
    except (ssl.SSLError, ConnectionError) as exc:
        return "after", exc
    finally:
        await shut(writer)


def _assert_refused(stage: str, outcome: BaseException | bytes, max_version: ssl.TLSVersion) -> None:
    # TLS 1.2: the server checks the client certificate inside the handshake, so the client's
    # handshake fails. TLS 1.3: the client finishes first and learns of the refusal on its
    # first read. Either way no HTTP byte ever comes back.
    if max_version == ssl.TLSVersion.TLSv1_2:
        assert stage == "handshake", (stage, outcome)
    assert isinstance(outcome, (ssl.SSLError, ConnectionError)) or outcome == b"", (stage, outcome)


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
async def test_tls_without_client_certificate_is_refused(
    max_version: ssl.TLSVersion, pki: DemoPki, short_tmp: Path
) -> None:
    async with http_connect_stack(pki, short_tmp, "tls") as (stack, access):
        await stack.add_agent()
        context = client_tls(pki)
        context.maximum_version = max_version
        _assert_refused(*await _tls_refused(access, context), max_version)
        assert http_connections(stack) == 0
        assert stack.server.metrics.dial_failures.value(str(DialFailure.ERROR_RESPONSE)) == 0


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
async def test_tls_client_certificate_from_another_ca_is_refused(
    max_version: ssl.TLSVersion, pki: DemoPki, short_tmp: Path
) -> None:
    other_ca = make_ca("someone-else")
    cert, key = write_pair(short_tmp / "other", "client", issue(other_ca, "intruder", client=True))
    async with http_connect_stack(pki, short_tmp, "tls") as (stack, access):
        await stack.add_agent()
        context = client_tls(pki, cert, key)
        context.maximum_version = max_version
        _assert_refused(*await _tls_refused(access, context), max_version)
        assert http_connections(stack) == 0
        # The same server still serves a client with a good certificate.
        async with endpoint(echo_handler) as ep:
            _reader, writer, head = await connect(access, ep.address)
            assert head == ESTABLISHED
            await shut(writer)


async def test_cipher_suites_limit_the_tls12_suites(pki: DemoPki, short_tmp: Path) -> None:
    """--cipher-suites applies to the TCP frontend as to the reference's (TLS 1.2 suites only)."""
    allowed, other = "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256"
    async with http_connect_stack(
        pki, short_tmp, "tls", cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",)
    ) as (stack, access):
        await stack.add_agent()
        refused = client_tls(pki, pki.client_cert, pki.client_key)
        refused.maximum_version = ssl.TLSVersion.TLSv1_2
        refused.set_ciphers(other)
        with pytest.raises((ssl.SSLError, ConnectionError)):  # the server ends the handshake
            await access.open(refused)
        accepted = client_tls(pki, pki.client_cert, pki.client_key)
        accepted.maximum_version = ssl.TLSVersion.TLSv1_2
        accepted.set_ciphers(allowed)
        async with endpoint(echo_handler) as ep:
            reader, writer = await access.open(accepted)
            assert writer.get_extra_info("cipher")[0] == allowed
            writer.write(connect_request(ep.address))
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == ESTABLISHED
            await shut(writer)


# ------------------------------------------- configs/egress-selector, end to end
EGRESS_DIR = ROOT / "configs" / "egress-selector"


def test_frontend_header_timeout_flag() -> None:
    parse = server_cli.build_parser().parse_args
    assert server_cli.config_from_args(parse([])).frontend_header_timeout == 60.0
    assert server_cli.config_from_args(parse(["--frontend-header-timeout=1m30s"])).frontend_header_timeout == 90.0
    bad = dataclasses.replace(server_config_for_flags(), frontend_header_timeout=0)
    with pytest.raises(ConfigError, match="--frontend-header-timeout must be positive"):
        bad.validate()


def server_config_for_flags() -> ServerConfig:
    return server_cli.config_from_args(server_cli.build_parser().parse_args([]))


@pytest.mark.parametrize("path", sorted(EGRESS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
async def test_egress_config_works_with_the_flags_it_documents(path: Path, pki: DemoPki, short_tmp: Path) -> None:
    """Run the server the file's comment documents (paths moved to this test's PKI and socket)
    and connect as kube-apiserver would (tests/unit/test_egress_selector_configs.py checks the
    file against those flags)."""
    body = yaml.safe_load(path.read_text())
    (selection,) = body["egressSelections"]
    connection, transport = selection["connection"], selection["connection"]["transport"]
    config = egress_configs.server_config(egress_configs.documented_flags(path))
    assert egress_configs.flag_mismatches(body, config) == []
    overrides: dict[str, object] = {"mode": config.mode}
    if "tcp" in transport:
        overrides.update(
            uds_name="",
            server_bind_address=config.server_bind_address,
            server_port=0,
            server_cert=str(pki.server_cert),
            server_key=str(pki.server_key),
            server_ca_cert=str(pki.ca_cert),
        )
    stack = await Stack(pki, short_tmp, **overrides).start()
    try:
        await stack.add_agent()
        async with endpoint(http_handler) as ep:
            if connection["proxyProtocol"] == "GRPC":
                tunnel = await open_tunnel(ep.address, uds_path=stack.uds, timeout=10)
                await tunnel.send(b"GET /grpc HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await tunnel.receive()).startswith(b"HTTP/1.1 200 OK")
                await tunnel.aclose()
            else:
                kind = "uds" if "uds" in transport else "tls"
                access = Access(
                    kind,
                    uds=stack.uds,
                    port=stack.server.frontend_port,
                    tls=client_tls(pki, pki.client_cert, pki.client_key),
                )
                reader, writer = await access.open()
                writer.write(f"CONNECT {ep.address} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())  # as kube-apiserver
                assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == ESTABLISHED
                writer.write(b"GET /egress HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await read_all(reader)).endswith(b"hello from /egress</body></html>")
                await shut(writer)
        await settled(stack)
    finally:
        await stack.stop()
