"""Own streams on demand: connections start on the shared Connect stream and move onto their
own stream once they have carried `--flow-upgrade-bytes`, without losing or reordering a byte.

Real server and agent over real gRPC; the payloads depend on their position, so a byte
moved, lost or repeated anywhere changes the digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from proxy_agent import debug as agent_debug
from proxy_agent.flow import FLOW_METHOD
from proxy_common import metadata
from proxy_common.certs import DemoPki
from proxy_common.client import Tunnel, open_tunnel
from proxy_common.errors import TunnelClosed
from proxy_common.messages import CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Message, OwnStream
from proxy_common.streams import CONNECT_METHOD, ClientStream, ServerStream
from proxy_server import debug as server_debug
from tests.harness import (
    RunningAgent,
    Stack,
    agent_config,
    agent_metric,
    agent_service_server,
    echo,
    echo_handler,
    endpoint,
    server_metric,
    source_handler,
    wait_for,
)

pytestmark = pytest.mark.integration
THRESHOLD = 64 << 10
BIG = 64 << 20
PIECE = 64 << 10


def pieces(size: int, seed: bytes, piece: int = PIECE) -> list[bytes]:
    """`size` bytes in pieces that all differ (each depends on its position)."""
    out = []
    for index in range(0, size, piece):
        out.append(hashlib.shake_256(seed + index.to_bytes(8, "big")).digest(min(piece, size - index)))
    return out


def digest_of(parts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def upgrades(stack: Stack) -> tuple[float, float]:
    running = stack.agents[0]
    return (server_metric(stack.server, "own_stream_upgrades_total"), agent_metric(running, "own_stream_upgrades_total"))


def on_own_streams(stack: Stack) -> list[bool]:
    return [e.own_stream for a in stack.agents for s in a.agent.clients.sessions.values() for e in s.endpoints.values()]


def debug_own_streams(stack: Stack) -> tuple[list[bool], list[bool]]:
    """The `own_stream` fields of the server's and the agents' /debug/connections rows."""
    server = [row["own_stream"] for row in server_debug.connections(stack.server.board) if row["frontend_id"]]
    agents = [row["own_stream"] for a in stack.agents for row in agent_debug.connections(a.agent.clients)]
    return server, agents


async def drain(tunnel: Tunnel, limit: int | None = None) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while (limit is None or size < limit) and (chunk := await tunnel.receive()):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def agent_endpoints(running: RunningAgent) -> int:
    """Endpoint connections the agent still runs a task for, over all its server streams."""
    return sum(len(session.endpoints) for session in running.agent.clients.sessions.values())


async def assert_tables_empty(stack: Stack) -> None:
    await stack.wait_idle()
    board = stack.server.board
    await wait_for(lambda: not board.connection_links and not board.frontends, what="server links gone")
    await wait_for(lambda: not any(agent_endpoints(a) for a in stack.agents), what="agent endpoints gone")


async def test_small_connections_never_leave_the_shared_stream(stack: Stack) -> None:
    running = await stack.add_agent()
    assert all(s.flow_token for s in running.agent.clients.sessions.values()), "flow control was not negotiated"
    async with endpoint(echo_handler) as ep:
        for _ in range(3):
            async with await open_tunnel(ep.address, uds_path=stack.uds) as tunnel:
                await echo(tunnel, bytes(range(64)))
                assert not stack.server.board.connection_links
                assert on_own_streams(stack) == [False]
                assert debug_own_streams(stack) == ([False], [False])
    assert upgrades(stack) == (0, 0)
    await assert_tables_empty(stack)


async def test_zero_threshold_gives_every_connection_its_own_stream_at_once(stack: Stack) -> None:
    await stack.add_agent(flow_upgrade_bytes=0)
    async with endpoint(echo_handler) as ep, await open_tunnel(ep.address, uds_path=stack.uds) as tunnel:
        await echo(tunnel, bytes(range(64)))
        assert len(stack.server.board.connection_links) == 1
        assert on_own_streams(stack) == [True]
        assert debug_own_streams(stack) == ([True], [True])
    assert upgrades(stack) == (0, 0)  # nothing was moved: it started there
    await assert_tables_empty(stack)


@pytest.mark.parametrize("direction", ["down", "up", "both"])
async def test_big_transfers_move_mid_transfer_and_keep_every_byte_in_order(stack: Stack, direction: str) -> None:
    await stack.add_agent()
    down = pieces(BIG, b"down") if direction in ("down", "both") else []
    up = pieces(BIG, b"up") if direction in ("up", "both") else []

    async def endpoint_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            for part in down:
                writer.write(part)
                await writer.drain()

        async def receive() -> str:
            size, digest = 0, hashlib.sha256()
            while size < BIG and (data := await reader.read(1 << 20)):
                digest.update(data)
                size += len(data)
            return f"{size}:{digest.hexdigest()}"

        sender = asyncio.create_task(send())
        received = await receive() if up else ""
        await sender
        if up:
            writer.write(received.encode().ljust(128))
            await writer.drain()

    seen = {"link": False, "own": False}

    async def watch() -> None:
        """Whether the connection was ever seen on its own stream at both ends (bounded)."""
        for _ in range(20_000):
            seen["link"] |= bool(stack.server.board.connection_links)
            seen["own"] |= any(on_own_streams(stack))
            await asyncio.sleep(0.005)

    async with endpoint(endpoint_side) as ep, await open_tunnel(ep.address, uds_path=stack.uds) as tunnel:

        async def client_send() -> None:
            for part in up:
                await tunnel.send(part)

        async with asyncio.timeout(120):
            watcher = asyncio.create_task(watch())
            sending = asyncio.create_task(client_send())
            got = await drain(tunnel, BIG) if down else (0, "")
            await sending
            if up:
                answer = b""
                while len(answer) < 128:
                    chunk = await tunnel.receive()
                    assert chunk, "closed before the endpoint's answer"
                    answer += chunk
                assert answer.decode().strip() == f"{BIG}:{digest_of(up)}"
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if down:
            assert got == (BIG, digest_of(down))
        assert seen == {"link": True, "own": True}
    assert upgrades(stack) == (1, 1)
    await assert_tables_empty(stack)


async def test_many_small_writes_around_the_threshold_stay_in_order(stack: Stack) -> None:
    """An echo with 1000 x 1 KiB writes each way, interleaved: the switch happens among them."""
    await stack.add_agent()
    parts = pieces(1000 << 10, b"small", 1 << 10)
    async with endpoint(echo_handler) as ep, await open_tunnel(ep.address, uds_path=stack.uds) as tunnel:
        reader, writer = await tunnel.open_streams()

        async def send() -> None:
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0)

        async with asyncio.timeout(60):
            sending = asyncio.create_task(send())
            received = await reader.readexactly(1000 << 10)
            await sending
        assert hashlib.sha256(received).hexdigest() == digest_of(parts)
        writer.close()
        await writer.wait_closed()
    assert upgrades(stack) == (1, 1)
    await assert_tables_empty(stack)


@pytest.mark.parametrize("extra", [0, 1, 4096])
async def test_client_closing_right_at_the_threshold_leaves_nothing_behind(stack: Stack, extra: int) -> None:
    await stack.add_agent()
    async with endpoint(echo_handler) as ep:
        for _ in range(3):
            tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
            await tunnel.send(bytes(THRESHOLD // 2 + extra))
            await tunnel.aclose()  # the echo carries it past the threshold while we close
    await assert_tables_empty(stack)


@pytest.mark.parametrize("sent", [THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, 3 * THRESHOLD])
async def test_endpoint_closing_right_at_the_threshold_delivers_everything(stack: Stack, sent: int) -> None:
    await stack.add_agent()
    parts = pieces(sent, b"close", 4096)

    async def send_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
        await writer.drain()

    async with endpoint(send_then_close) as ep, await open_tunnel(ep.address, uds_path=stack.uds) as tunnel:
        async with asyncio.timeout(20):
            assert await drain(tunnel) == (sent, digest_of(parts))
    await assert_tables_empty(stack)


async def test_agent_stream_lost_mid_switch_cleans_up(stack: Stack) -> None:
    running = await stack.add_agent()
    async with endpoint(echo_handler) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        await tunnel.send(bytes(THRESHOLD))
        await running.stop()  # the agent and its streams go while the connection is moving
        async with asyncio.timeout(20):
            await drain(tunnel)
        await tunnel.aclose()
    await wait_for(lambda: stack.server.router.is_empty() and not stack.server.board.connection_links,
                   what="server tables empty")
    stack.agents.clear()


# ------------------------------------------------------- the server against a raw agent
@contextlib.asynccontextmanager
async def raw_flow_agent(stack: Stack) -> AsyncIterator[tuple[grpc.aio.Channel, ClientStream, str]]:
    """A Connect stream that negotiates flow control, driven packet by packet by the test."""
    creds = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{stack.server.agent_port}", creds)
    md = [(metadata.AGENT_ID, "raw-agent"), (metadata.FLOW_CONTROL, metadata.FLOW_CONTROL_VERSION)]
    call = channel.stream_stream(CONNECT_METHOD)(metadata=md)
    try:
        async with asyncio.timeout(5):
            headers = await call.initial_metadata()
        token = metadata.single(headers, metadata.SESSION)
        assert token
        yield channel, ClientStream(call), token
    finally:
        call.cancel()
        await channel.close()


async def receive(stream: ClientStream) -> Message:
    async with asyncio.timeout(5):
        return await stream.receive()


async def dial_through(stack: Stack, shared: ClientStream) -> Tunnel:
    opening = asyncio.create_task(open_tunnel("10.0.0.5:443", uds_path=stack.uds))
    request = await receive(shared)
    assert type(request) is DialRequest
    await shared.send(DialResponse(request.dial_id, conn_id=1))
    async with asyncio.timeout(5):
        return await opening


async def test_server_closes_a_connection_whose_own_stream_never_comes(stack: Stack) -> None:
    stack.server.board.own_stream_wait = 0.5
    async with raw_flow_agent(stack) as (_channel, shared, _token):
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
        tunnel = await dial_through(stack, shared)
        await shared.send(OwnStream(1))
        assert await receive(shared) == OwnStream(1)  # the server switched its side
        assert await receive(shared) == CloseRequest(1)  # ... and gave up waiting for the stream
        async with asyncio.timeout(5):
            assert await tunnel.receive() == b""
        await tunnel.aclose()
        await wait_for(lambda: stack.server.router.is_empty() and not stack.server.board.connection_links,
                       what="server tables empty")
    assert server_metric(stack.server, "own_stream_upgrades_total") == 1


async def test_own_stream_arriving_before_the_marker_waits_for_it(stack: Stack) -> None:
    async with raw_flow_agent(stack) as (channel, shared, token):
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
        tunnel = await dial_through(stack, shared)
        own_call = channel.stream_stream(FLOW_METHOD)(metadata=((metadata.SESSION, token),))
        own = ClientStream(own_call)
        try:
            await own.send(OwnStream(1))
            await own.send(Data(1, b"second"))
            await asyncio.sleep(0.2)  # give a server that read it too early the time to forward it
            await shared.send(Data(1, b"first"))
            await shared.send(OwnStream(1))
            received = b""
            async with asyncio.timeout(5):
                while len(received) < len(b"firstsecond"):
                    received += await tunnel.receive()
            assert received == b"firstsecond"
            assert await receive(shared) == OwnStream(1)
            await tunnel.send(b"down")
            assert await receive(own) == Data(1, b"down")  # after the switch: on the own stream only
            await own.send(CloseResponse(1))
            async with asyncio.timeout(5):
                assert await tunnel.receive() == b""
            await tunnel.aclose()
            await own_call.done_writing()
            await wait_for(lambda: stack.server.router.is_empty() and not stack.server.board.connection_links,
                           what="server tables empty")
        finally:
            own_call.cancel()


async def test_a_connection_stream_gets_its_headers_before_any_packet(stack: Stack) -> None:
    # Headers go out on their own when the stream opens: if they rode on the first packet and
    # that write was cut short by the stream's end, grpc would refuse the final status
    # (TOO_MANY_OPERATIONS, an error with a traceback in the server log).
    async with raw_flow_agent(stack) as (channel, _shared, token):
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
        own_call = channel.stream_stream(FLOW_METHOD)(metadata=((metadata.SESSION, token),))
        try:
            async with asyncio.timeout(2):
                await own_call.initial_metadata()  # nothing sent yet, nothing to answer
        finally:
            own_call.cancel()


# ------------------------------------------------------- the agent against a scripted server
class ScriptedFlowServer:
    """Offers flow control on Connect and serves ConnectionService; the test drives both."""

    def __init__(self, pki: DemoPki) -> None:
        self.shared_in: asyncio.Queue[Message] = asyncio.Queue()
        self.shared_out: asyncio.Queue[Message] = asyncio.Queue()
        self.own_in: asyncio.Queue[Message] = asyncio.Queue()
        self.own_ended = asyncio.Event()
        self.server, self.port = agent_service_server(pki, self._connect)
        own = grpc.stream_stream_rpc_method_handler(self._own)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(FLOW_METHOD.split("/")[1], {"Stream": own}),)
        )

    async def _connect(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.send_initial_metadata((
            (metadata.SERVER_ID, "scripted"), (metadata.SERVER_COUNT, "1"),
            (metadata.FLOW_CONTROL, metadata.FLOW_CONTROL_VERSION), (metadata.SESSION, "token"),
        ))
        await self._pump(ServerStream(context), self.shared_in, self.shared_out)

    async def _own(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        assert metadata.single(context.invocation_metadata(), metadata.SESSION) == "token"
        try:
            await self._pump(ServerStream(context), self.own_in, None)
        finally:
            self.own_ended.set()

    @staticmethod
    async def _pump(stream: ServerStream, inbound: asyncio.Queue[Message], outbound: asyncio.Queue[Message] | None) -> None:
        async def send() -> None:
            while outbound is not None:
                await stream.send(await outbound.get())

        sender = asyncio.create_task(send())
        try:
            while True:
                try:
                    await inbound.put(await stream.receive())
                except TunnelClosed:
                    return
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


async def next_of(queue: asyncio.Queue[Message]) -> Message:
    async with asyncio.timeout(5):
        return await queue.get()


@contextlib.asynccontextmanager
async def scripted_dial(
    script: ScriptedFlowServer, pki: DemoPki, handler: Any, *, flow_upgrade_bytes: int = THRESHOLD
) -> AsyncIterator[tuple[RunningAgent, Any, DialResponse]]:
    """An agent of `script`'s that dialed `handler`'s endpoint: (agent, endpoint, DIAL_RSP).
    The DIAL_RSP comes on the shared stream, or first on the own stream when the threshold is 0."""
    await script.server.start()
    running = RunningAgent(agent_config(pki, script.port, flow_upgrade_bytes=flow_upgrade_bytes))
    try:
        async with endpoint(handler) as ep:
            await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
            await script.shared_out.put(DialRequest(1, ep.address))
            response = await next_of(script.own_in if flow_upgrade_bytes == 0 else script.shared_in)
            assert type(response) is DialResponse
            yield running, ep, response
    finally:
        await running.stop()
        await script.server.stop(0)


async def test_agent_close_request_before_the_servers_marker_flushes_then_closes_on_the_own_stream(pki: DemoPki) -> None:
    script = ScriptedFlowServer(pki)
    received = bytearray()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            received.extend(data)

    async with scripted_dial(script, pki, sink) as (running, ep, response):
        assert response.conn_id and not response.error
        conn = response.conn_id
        payload = pieces(THRESHOLD, b"before-close", 4096)
        for part in payload:  # past the threshold: the agent moves the connection
            await script.shared_out.put(Data(conn, part))
        assert await next_of(script.shared_in) == OwnStream(conn)  # its marker on the shared stream
        assert await next_of(script.own_in) == OwnStream(conn)  # and first on the own stream
        # The frontend closes before our marker goes back: CLOSE_REQ on the shared stream.
        await script.shared_out.put(CloseRequest(conn))
        await script.shared_out.put(OwnStream(conn))
        assert await next_of(script.own_in) == CloseResponse(conn)  # on the own stream, not the shared one
        async with asyncio.timeout(5):
            await script.own_ended.wait()
        await wait_for(lambda: running.connection_count() == 0 and ep.open_connections == 0, what="agent closed it")
        assert bytes(received) == b"".join(payload)
        assert script.shared_in.empty()
        assert agent_metric(running, "own_stream_upgrades_total") == 1


async def test_agent_endpoint_closing_during_the_switch_closes_on_the_own_stream(pki: DemoPki) -> None:
    script = ScriptedFlowServer(pki)

    async def read_threshold_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(THRESHOLD)

    async with scripted_dial(script, pki, read_threshold_then_close) as (running, _ep, response):
        assert response.conn_id
        conn = response.conn_id
        await script.shared_out.put(Data(conn, bytes(THRESHOLD)))
        assert await next_of(script.shared_in) == OwnStream(conn)
        assert await next_of(script.own_in) == OwnStream(conn)
        # The endpoint is gone before the server's marker came back: the close goes after the marker.
        assert await next_of(script.own_in) == CloseResponse(conn)
        async with asyncio.timeout(5):
            await script.own_ended.wait()
        # The server ended the stream without its marker: nothing of the connection is left
        # waiting for it (its reader task used to wait until the session ended).
        await wait_for(lambda: running.connection_count() == 0 and not agent_endpoints(running),
                       what="agent table and connection tasks empty")
        assert script.shared_in.empty()


class StallingOwnStreamServer(ScriptedFlowServer):
    """Reads only the first packet of an own stream, then nothing: the agent's writes on it
    fill the HTTP/2 window and block."""

    async def _own(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            await self.own_in.put(await ServerStream(context).receive())
            await asyncio.Event().wait()
        finally:
            self.own_ended.set()


async def test_stopping_the_agent_does_not_wait_for_a_blocked_write_on_an_own_stream(pki: DemoPki) -> None:
    async def endless(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(bytes(64 << 10))
            await writer.drain()

    async with scripted_dial(StallingOwnStreamServer(pki), pki, endless, flow_upgrade_bytes=0) as (running, _ep, _rsp):
        (session,) = running.agent.clients.sessions.values()
        (conn,) = session.endpoints.values()
        carried = -1
        async with asyncio.timeout(10):
            while conn.bytes_out != carried:  # until the pump waits in a write that cannot end
                carried = conn.bytes_out
                await asyncio.sleep(0.3)
        async with asyncio.timeout(5):
            await running.stop()  # what SIGTERM does after the drain grace


class LateDataServer(ScriptedFlowServer):
    """On an own stream: reads up to the agent's CLOSE_RSP and half-close, sends one more DATA
    (it was on its way), then ends the stream itself a little later if nobody cancelled it."""

    def __init__(self, pki: DemoPki) -> None:
        super().__init__(pki)
        self.ended_by_us = asyncio.Event()

    async def _own(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        stream = ServerStream(context)
        try:
            first = await stream.receive()
            await self.own_in.put(first)
            while type(message := await stream.receive()) is not CloseResponse:
                await self.own_in.put(message)
            await self.own_in.put(message)
            with contextlib.suppress(TunnelClosed):
                await stream.receive()  # the agent's half-close
            await stream.send(Data(first.conn_id, b"late"))
            await asyncio.sleep(0.3)
            self.ended_by_us.set()
        finally:
            self.own_ended.set()


async def test_data_arriving_after_the_endpoint_closed_does_not_cut_the_goodbye_short(pki: DemoPki) -> None:
    # The agent must leave ending the stream to the server (cancelling earlier can drop what
    # it wrote last); a packet for the already closed endpoint must not make it cancel.
    async def says_hello_and_closes(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()

    script = LateDataServer(pki)
    async with scripted_dial(script, pki, says_hello_and_closes, flow_upgrade_bytes=0) as (running, _ep, response):
        assert await next_of(script.own_in) == Data(response.conn_id, b"hello")
        assert await next_of(script.own_in) == CloseResponse(response.conn_id)
        async with asyncio.timeout(5):
            await script.own_ended.wait()
        assert script.ended_by_us.is_set()  # not cancelled by the agent meanwhile
        await wait_for(lambda: running.connection_count() == 0 and not agent_endpoints(running),
                       what="agent table and connection tasks empty")


async def test_an_endpoint_that_stops_reading_mid_switch_slows_only_itself(stack: Stack) -> None:
    """The client uploads to an endpoint that reads nothing for a while: its connection moves
    onto its own stream and stalls there, the others carry on, and nothing is lost."""
    await stack.add_agent()
    release = asyncio.Event()
    upload = pieces(64 << 20, b"stalled-up")

    async def late_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        size, digest = 0, hashlib.sha256()
        while size < len(upload) * PIECE and (data := await reader.read(1 << 20)):
            digest.update(data)
            size += len(data)
        writer.write(digest.hexdigest().encode())
        await writer.drain()

    async with endpoint(late_reader) as slow, endpoint(echo_handler) as fast:
        stalled = await open_tunnel(slow.address, uds_path=stack.uds)

        async def push() -> None:
            for part in upload:
                await stalled.send(part)

        pushing = asyncio.create_task(push())
        try:
            await wait_for(lambda: upgrades(stack) == (1, 1), what="the stalled connection moved")
            async with asyncio.timeout(30):
                for _ in range(8):
                    async with await open_tunnel(fast.address, uds_path=stack.uds) as tunnel:
                        await echo(tunnel, bytes(THRESHOLD * 2))
            assert not pushing.done(), "the upload finished although its endpoint read nothing"
            # Held back by the windows and capped buffers, not queued without bound.
            assert stack.agents[0].agent.clients.buffered_bytes() <= (4 << 20) + (256 << 10)
            assert stack.server.board.buffered_bytes() <= 2 * ((4 << 20) + (256 << 10))
            release.set()
            async with asyncio.timeout(30):
                await pushing
                answer = b""
                while len(answer) < 64:
                    chunk = await stalled.receive()
                    assert chunk
                    answer += chunk
            assert answer.decode() == digest_of(upload)
        finally:
            pushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pushing
            await stalled.aclose()
    assert stack.server.metrics.overflow_closes._value.get() == 0
    assert agent_metric(stack.agents[0], "closed_endpoint_connections_total", reason="overflow") == 0
    await assert_tables_empty(stack)


async def test_two_close_requests_before_the_servers_marker_end_only_that_connection(pki: DemoPki) -> None:
    """The server sends CLOSE_REQ when its client asks and again when the client's stream
    ends; both may cross the agent's marker on the shared stream. The second one used to hit
    a finished flush deadline and take the whole agent down."""
    script = ScriptedFlowServer(pki)

    async def sink(reader: Any, writer: Any) -> None:
        while await reader.read(1 << 16):
            pass

    async with scripted_dial(script, pki, sink) as (running, _ep, response):
        conn = response.conn_id
        await script.shared_out.put(Data(conn, bytes(THRESHOLD)))
        assert await next_of(script.shared_in) == OwnStream(conn)
        assert await next_of(script.own_in) == OwnStream(conn)
        for _ in range(2):
            await script.shared_out.put(CloseRequest(conn))
        assert await next_of(script.own_in) == CloseResponse(conn)
        await asyncio.sleep(0.5)  # let any late failure surface
        assert not running.task.done(), running.task.exception() if running.task.done() else None
        assert running.agent.clients.is_connected()


@pytest.mark.parametrize("threshold", [0, THRESHOLD])
async def test_a_close_while_the_agent_writes_on_the_own_stream_is_answered_on_it(stack: Stack, threshold: int) -> None:
    # The endpoint keeps sending and the client has stopped reading, so the agent's pump waits
    # in a write on the connection's own stream when the close request comes. Cancelling that
    # write would cancel the whole stream and lose the agent's CLOSE_RSP; the server would
    # only learn of the close from the stream's end (or, mid-switch, not at all for 10 s).
    await stack.add_agent(flow_upgrade_bytes=threshold)
    async with endpoint(source_handler(1 << 30)) as src:
        tunnel = await open_tunnel(src.address, uds_path=stack.uds)
        got = 0
        while got < 2 * THRESHOLD:
            got += len(await tunnel.receive())
        await wait_for(lambda: on_own_streams(stack) == [True], what="the connection on its own stream")
        await wait_for(lambda: stack.server.board.buffered_bytes() >= 1 << 20, what="backpressure up to the agent")
        await tunnel.aclose()
        assert tunnel.close_error == ""
    assert server_metric(stack.server, "closed_connections_total", reason="agent_closed") == 1
    assert server_metric(stack.server, "closed_connections_total", reason="stream_lost") == 0
    await assert_tables_empty(stack)


async def _own_stream_for(stack: Stack, channel: grpc.aio.Channel, shared: ClientStream, token: str,
                          conn_id: int) -> tuple[Any, ClientStream]:
    """Move connection `conn_id` onto a stream of its own, as our agent does."""
    own_call = channel.stream_stream(FLOW_METHOD)(metadata=((metadata.SESSION, token),))
    own = ClientStream(own_call)
    await shared.send(OwnStream(conn_id))
    await own.send(OwnStream(conn_id))
    assert await receive(shared) == OwnStream(conn_id)
    await wait_for(lambda: any(k[1] == conn_id for k in stack.server.board.connection_links), what="own link")
    return own_call, own


async def test_the_server_ends_an_own_stream_once_its_close_response_came(stack: Stack) -> None:
    """A grpc.aio agent whose call failed locally after its CLOSE_RSP never half-closes: the
    server must not wait for that, or the stream stays open (a churn test found it)."""
    async with raw_flow_agent(stack) as (channel, shared, token):
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
        tunnel = await dial_through(stack, shared)
        own_call, own = await _own_stream_for(stack, channel, shared, token, 1)
        try:
            await own.send(CloseResponse(1))
            with pytest.raises(TunnelClosed):  # the server's end, though we never half-closed
                await receive(own)
            async with asyncio.timeout(5):
                assert await tunnel.receive() == b""
            await tunnel.aclose()
            await wait_for(lambda: stack.server.router.is_empty() and not stack.server.board.connection_links,
                           what="server tables empty")
        finally:
            own_call.cancel()

