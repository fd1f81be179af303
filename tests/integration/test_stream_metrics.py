"""Stream metrics the reference updates: `full_receive_channels` and `stream_errors_total`
(server), `stream_errors_total` and `server_connection_failure_count` (agent), driven by
real peers on loopback and read back from the registries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from proxy_common.certs import DemoPki
from proxy_common.client import open_tunnel
from proxy_common.messages import Data, DialRequest, DialResponse
from proxy_common.metrics import go_code_name
from proxy_common.streams import ClientStream
from tests.harness import (
    AGENT,
    RunningAgent,
    Stack,
    agent_config,
    agent_metric,
    agent_service_server,
    echo_handler,
    endpoint,
    server_metric,
    wait_for,
)
from tests.integration.test_interop_server import AGENT_MD, agent_stream, proxy_stream, receive

pytestmark = pytest.mark.integration
CHUNK = 64 << 10
MAX_CHUNKS = 2048  # 128 MiB: far beyond every buffer and HTTP/2 window on the way


def full_channels(stack: Stack, method: str) -> float:
    return server_metric(stack.server, "full_receive_channels", service_method=method)


async def open_connection(stack: Stack, agent: ClientStream, frontend: ClientStream) -> None:
    await agent.call.initial_metadata()
    await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
    await frontend.send(DialRequest(7, "10.0.0.1:80"))
    assert await receive(agent) == DialRequest(7, "10.0.0.1:80")
    await agent.send(DialResponse(7, conn_id=1))
    assert await receive(frontend) == DialResponse(7, conn_id=1)


async def flood_until(sender: ClientStream, done: Callable[[], bool]) -> int:
    """Send DATA for conn 1 until `done()` (the peer reads nothing meanwhile); bounded in count."""
    for sent in range(MAX_CHUNKS):
        if done():
            return sent
        await sender.send(Data(1, b"x" * CHUNK))
    raise AssertionError(f"{MAX_CHUNKS} chunks sent and the condition never held")


async def read_until(reader: ClientStream, done: Callable[[], bool]) -> None:
    """Read what the server forwards until `done()`; each read is bounded by a timeout."""
    while not done():
        message = await receive(reader)
        assert type(message) is Data


async def block_then_release(stack: Stack, flooder: ClientStream, drainer: ClientStream, blocked: str, other: str) -> int:
    """Flood from `flooder` (nobody reads) until the server's `blocked` reader waits on a full
    channel, counted under that service method only; then read at `drainer` until that reader
    moves on and the gauge falls back. Returns the packets sent."""
    flooding = asyncio.create_task(flood_until(flooder, lambda: full_channels(stack, blocked) == 1))
    try:
        await wait_for(lambda: full_channels(stack, blocked) == 1, what=f"{blocked} reader blocked", timeout=30)
        assert full_channels(stack, other) == 0
        await read_until(drainer, lambda: flooding.done() and full_channels(stack, blocked) == 0)
    finally:
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooding
    return flooding.result()


async def test_frontend_reader_blocked_by_a_full_agent_stream_counts_under_proxy(stack: Stack) -> None:
    async with agent_stream(stack, AGENT_MD) as agent, proxy_stream(stack) as frontend:
        await open_connection(stack, agent, frontend)
        assert full_channels(stack, "Proxy") == 0
        # The agent reads nothing: its stream and mailbox fill, then the frontend's reader waits
        # until the agent catches up.
        assert await block_then_release(stack, frontend, agent, "Proxy", "Connect") > 0
    await stack.wait_idle()


async def test_agent_reader_blocked_by_a_slow_frontend_counts_under_connect(pki: DemoPki, short_tmp: Any) -> None:
    # A long overflow wait, so the blocked reader stays blocked until the frontend reads.
    stack = await Stack(pki, short_tmp, frontend_buffer_bytes=256 << 10, overflow_wait=60.0).start()
    try:
        async with agent_stream(stack, AGENT_MD) as agent, proxy_stream(stack) as frontend:
            await open_connection(stack, agent, frontend)
            assert await block_then_release(stack, agent, frontend, "Connect", "Proxy") > 0
            assert stack.server.metrics.overflow_closes._value.get() == 0
        await stack.wait_idle()
    finally:
        await stack.stop()


@pytest.mark.parametrize("segment", ["from_client", "from_agent"])
async def test_undecodable_packet_counts_as_a_stream_error_like_gos_unmarshal_failure(stack: Stack, segment: str) -> None:
    stream_cm = proxy_stream(stack) if segment == "from_client" else agent_stream(stack, AGENT_MD)
    async with stream_cm as stream:
        await stream.call.write(b"\xff\xff\xff")  # not a Packet
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with asyncio.timeout(5):
                await stream.call.read()
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    await wait_for(lambda: server_metric(stack.server, "stream_errors_total", segment=segment, code="Internal", packet_type="Unknown") == 1,
                   what="stream error counted")
    other = "from_agent" if segment == "from_client" else "from_client"
    assert server_metric(stack.server, "stream_errors_total", segment=other, code="Internal", packet_type="Unknown") == 0
    await stack.wait_idle()


# ------------------------------------------------------------------------------- agent side
class EndingServer:
    """An AgentService that sends its headers, then ends every stream the way `end` says."""

    def __init__(self, pki: DemoPki, end: Callable[[grpc.aio.ServicerContext[Any, Any]], Any]) -> None:
        self.end = end
        self.streams = 0
        self.server, self.port = agent_service_server(pki, self._connect)

    async def _connect(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.streams += 1
        await context.send_initial_metadata((("serverid", "ending-server"), ("servercount", "1")))
        await self.end(context)


@contextlib.asynccontextmanager
async def agent_against(pki: DemoPki, end: Callable[[grpc.aio.ServicerContext[Any, Any]], Any]) -> AsyncIterator[RunningAgent]:
    server = EndingServer(pki, end)
    await server.server.start()
    running = RunningAgent(agent_config(pki, server.port, sync_interval=5.0, sync_interval_cap=5.0))
    try:
        await wait_for(lambda: server.streams >= 1, what="agent connected")
        yield running
    finally:
        await running.stop()
        await server.server.stop(0)


async def abort_unavailable(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await asyncio.sleep(0.05)
    await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")


async def send_garbage(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.write(b"\xff\xff\xff")
    await context.read()  # the agent ends the stream


@pytest.mark.parametrize(("end", "code"), [(abort_unavailable, "Unavailable"), (send_garbage, "Internal")])
async def test_agent_counts_a_failed_receive_under_gos_code(pki: DemoPki, end: Any, code: str) -> None:
    async with agent_against(pki, end) as running:
        await wait_for(lambda: agent_metric(running, "stream_errors_total", segment="to_agent", code=code, packet_type="Unknown") >= 1,
                       what="agent stream error counted")
        assert agent_metric(running, "server_connection_failure_count", direction="from_server") >= 1
        assert agent_metric(running, "server_connection_failure_count", direction="to_server") == 0
        rendered = running.agent.metrics.render().decode()
        assert f'{AGENT}server_connection_failure_count{{direction="from_server"}}' in rendered


def test_go_code_names() -> None:
    assert [go_code_name(c.name) for c in grpc.StatusCode] == [
        "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
        "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
        "Internal", "Unavailable", "DataLoss", "Unauthenticated",
    ]


async def test_write_to_a_frontend_that_went_away_counts_as_a_stream_error(pki: DemoPki, short_tmp: Any) -> None:
    stack = await Stack(pki, short_tmp, frontend_buffer_bytes=256 << 10, overflow_wait=60.0).start()
    try:
        async with agent_stream(stack, AGENT_MD) as agent:
            async with proxy_stream(stack) as frontend:
                await open_connection(stack, agent, frontend)
                flooding = asyncio.create_task(flood_until(agent, lambda: full_channels(stack, "Connect") == 1))
                await wait_for(lambda: full_channels(stack, "Connect") == 1, what="agent reader blocked", timeout=30)
                await flooding
            # The frontend cancelled its stream while the server was writing to it.
            await wait_for(lambda: full_channels(stack, "Connect") == 0, what="agent reader released")
            await wait_for(lambda: server_metric(stack.server, "stream_errors_total", segment="to_client", code="Canceled",
                                                packet_type="DATA") == 1, what="write error counted")
        await stack.wait_idle()
    finally:
        await stack.stop()


@pytest.mark.parametrize("flow_control", [True, False], ids=["own-streams", "shared-stream"])
async def test_agent_counts_every_packet_the_server_counts(pki: DemoPki, short_tmp: Any, flow_control: bool) -> None:
    """Per-connection streams carry DATA too: the agent's packet counts match the server's."""
    stack = await Stack(pki, short_tmp).start()
    try:
        running = await stack.add_agent(flow_control=flow_control, flow_upgrade_bytes=0)
        async with endpoint(echo_handler) as ep:
            for _ in range(3):
                tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
                reader, writer = await tunnel.open_streams()
                writer.write(b"ping" * 1000)
                await writer.drain()
                assert await reader.readexactly(4000) == b"ping" * 1000
                writer.close()
                await writer.wait_closed()
        await stack.wait_idle()
        for segment, packet_type in [("from_agent", "DATA"), ("to_agent", "DATA"), ("to_agent", "CLOSE_REQ"),
                                     ("from_agent", "CLOSE_RSP"), ("from_agent", "DIAL_RSP")]:
            server = server_metric(stack.server, "stream_packets_total", segment=segment, packet_type=packet_type)
            await wait_for(lambda s=segment, t=packet_type, n=server: agent_metric(
                running, "stream_packets_total", segment=s, packet_type=t) == n, what=f"agent count of {segment} {packet_type}")
            assert server >= 3  # three connections, each with at least one of these
    finally:
        await stack.stop()
