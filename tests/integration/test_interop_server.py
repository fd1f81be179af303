"""Our proxy-server against raw gRPC peers that behave as the recorded Go agent and client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from proxy_common import wire
from proxy_common.messages import CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain, Message
from proxy_common.streams import CONNECT_METHOD, PROXY_METHOD, ClientStream
from tests.harness import Stack, echo_handler, endpoint, wait_for

pytestmark = pytest.mark.integration
INTEROP = Path(__file__).parents[1] / "interop"
RECORDED_NO_AGENT = "08011a1e0a124e6f206167656e7420617661696c61626c6518eedf8ae195ddc7f82f"


@contextlib.asynccontextmanager
async def agent_stream(stack: Stack, md: list[tuple[str, str]]) -> AsyncIterator[ClientStream]:
    """A raw Connect stream, as the Go agent opens it (TLS, metadata, nothing sent)."""
    creds = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes())
    channel = grpc.aio.secure_channel(f"127.0.0.1:{stack.server.agent_port}", creds)
    call = channel.stream_stream(CONNECT_METHOD)(metadata=md)
    try:
        yield ClientStream(call)
    finally:
        call.cancel()
        await channel.close()


@contextlib.asynccontextmanager
async def proxy_stream(stack: Stack) -> AsyncIterator[ClientStream]:
    channel = grpc.aio.insecure_channel(f"unix:{stack.uds}")
    call = channel.stream_stream(PROXY_METHOD)()
    try:
        yield ClientStream(call)
    finally:
        call.cancel()
        await channel.close()


async def receive(stream: ClientStream, timeout: float = 5.0) -> Message:
    async with asyncio.timeout(timeout):
        return await stream.receive()


AGENT_MD = [("agentid", "raw-agent"), ("agentidentifiers", "")]


async def test_agent_gets_headers_at_once_without_sending_anything(stack: Stack) -> None:
    async with agent_stream(stack, AGENT_MD) as stream:
        async with asyncio.timeout(2):
            headers = await stream.call.initial_metadata()
        ours = [(k, v) for k, v in headers if k in ("serverid", "servercount")]
        assert ours == [("serverid", "test-server"), ("servercount", "1")]
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
    await wait_for(lambda: not stack.server.registry.is_ready(), what="agent removed")


@pytest.mark.parametrize(
    ("md", "why"),
    [
        ([("agentidentifiers", "")], "expected exactly one agentid header"),
        ([("agentid", "a"), ("agentid", "b")], "expected exactly one agentid header"),
        ([("agentid", "a"), ("agentidentifiers", "ipv4=1.1.1.1"), ("agentidentifiers", "ipv4=2.2.2.2")], "at most one agentidentifiers"),
        ([("agentid", "a"), ("agentidentifiers", "ipv4=1;x")], "invalid agentidentifiers"),
    ],
)
async def test_bad_agent_headers_are_refused_before_registration(stack: Stack, md: list[tuple[str, str]], why: str) -> None:
    async with agent_stream(stack, md) as stream:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.call.read()
        assert why in (refused.value.details() or "")
        assert not stack.server.registry.is_ready()


async def test_unknown_identifier_keys_are_ignored(stack: Stack) -> None:
    async with agent_stream(stack, [("agentid", "a"), ("agentidentifiers", "uid=5&ipv4=10.0.0.5")]) as stream:
        await stream.call.initial_metadata()
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")


async def test_no_agent_answer_has_the_recorded_shape(stack: Stack) -> None:
    recorded = wire.decode(bytes.fromhex(RECORDED_NO_AGENT))
    assert isinstance(recorded, DialRequest | DialResponse)
    async with proxy_stream(stack) as stream:
        await stream.send(DialRequest(recorded.dial_id, "127.0.0.1:18400"))
        answer = await receive(stream)
    assert wire.encode(answer).hex() == RECORDED_NO_AGENT


async def test_data_and_close_before_dial(stack: Stack) -> None:
    async with proxy_stream(stack) as stream:
        await stream.send(CloseRequest(5))
        assert await receive(stream) == CloseResponse(5, "backend uninitialized")
        await stream.send(Data(5, b"x"))
        assert await receive(stream) == CloseResponse(5, "backend not initialized")


async def test_raw_agent_and_raw_client_full_exchange(stack: Stack) -> None:
    """The server forwards the client's DIAL_REQ unchanged and relays everything back."""
    async with agent_stream(stack, AGENT_MD) as agent, proxy_stream(stack) as client:
        await agent.call.initial_metadata()
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
        await client.send(DialRequest(2804321492849773039, "127.0.0.1:18400"))
        assert await receive(agent) == DialRequest(2804321492849773039, "127.0.0.1:18400")
        await agent.send(DialResponse(2804321492849773039, conn_id=1))
        assert await receive(client) == DialResponse(2804321492849773039, conn_id=1)
        await client.send(Data(1, b"GET /success HTTP/1.1\r\n\r\n"))
        assert await receive(agent) == Data(1, b"GET /success HTTP/1.1\r\n\r\n")
        await agent.send(Data(1, b"HTTP/1.1 200 OK\r\n\r\n"))
        assert await receive(client) == Data(1, b"HTTP/1.1 200 OK\r\n\r\n")
        await agent.send(Data(77, b"stray"))  # unknown connection: the server closes it at the agent
        assert await receive(agent) == CloseRequest(77)
        await agent.send(CloseResponse(77, "unrecognized connectID"))
        await client.send(CloseRequest(1))
        assert await receive(agent) == CloseRequest(1)
        await agent.send(CloseResponse(1))
        assert await receive(client) == CloseResponse(1)
        # As the Go server, ours leaves ending the stream to the client: it stays open for
        # whatever the client still sends (discarded, never an error) until the client ends it.
        await client.send(Data(1, b"late"))
        await asyncio.sleep(0.3)
        await client.send(Data(1, b"later"))
        assert len(stack.server.board.frontends) == 1
    await stack.wait_idle()  # the client ended its side on leaving the block


async def test_agent_disconnect_fails_pending_dial_at_once(stack: Stack) -> None:
    async with proxy_stream(stack) as client:
        async with agent_stream(stack, AGENT_MD) as agent:
            await agent.call.initial_metadata()
            await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
            await client.send(DialRequest(9, "10.0.0.1:80"))
            assert await receive(agent) == DialRequest(9, "10.0.0.1:80")
        answer = await receive(client, timeout=2.0)
        assert isinstance(answer, DialResponse) and answer.dial_id == 9 and answer.error
    assert stack.server.metrics.dial_failures.value("agent_lost") == 1
    await stack.wait_idle()


async def test_client_cancel_sends_dial_close_and_close_request_to_agent(stack: Stack) -> None:
    async with agent_stream(stack, AGENT_MD) as agent:
        await agent.call.initial_metadata()
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
        async with proxy_stream(stack) as pending:
            await pending.send(DialRequest(10, "10.0.0.1:80"))
            assert await receive(agent) == DialRequest(10, "10.0.0.1:80")
        # cancelled with a pending dial: the agent is told to abandon it
        from proxy_common.messages import CloseDial

        assert await receive(agent) == CloseDial(10)
        async with proxy_stream(stack) as open_one:
            await open_one.send(DialRequest(11, "10.0.0.1:80"))
            assert await receive(agent) == DialRequest(11, "10.0.0.1:80")
            await agent.send(DialResponse(11, conn_id=3))
            assert await receive(open_one) == DialResponse(11, conn_id=3)
        assert await receive(agent) == CloseRequest(3)
        await agent.send(CloseResponse(3))
        await stack.wait_idle()


async def test_reusable_client_many_streams_on_one_connection(stack: Stack) -> None:
    from proxy_common.client import TunnelClient

    await stack.add_agent()
    async with endpoint(echo_handler) as ep, TunnelClient.over_uds(stack.uds) as client:
        tunnels = await asyncio.gather(*(client.dial(ep.address) for _ in range(50)))
        for index, tunnel in enumerate(tunnels):
            await tunnel.send(f"stream {index}".encode())
        for index, tunnel in enumerate(tunnels):
            assert await tunnel.receive() == f"stream {index}".encode()
        await asyncio.gather(*(t.aclose() for t in tunnels[:25]))
        # closing half of them leaves the others (and the shared connection) working
        for tunnel in tunnels[25:]:
            await tunnel.send(b"still here")
            assert await tunnel.receive() == b"still here"
        await asyncio.gather(*(t.aclose() for t in tunnels[25:]))
    await stack.wait_idle()


async def test_drain_then_only_agent_still_used(stack: Stack) -> None:
    async with agent_stream(stack, AGENT_MD) as agent, proxy_stream(stack) as client:
        await agent.call.initial_metadata()
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent registered")
        await agent.send(Drain())
        await wait_for(lambda: stack.server.registry.backends()[0].draining, what="draining flag")
        await client.send(DialRequest(12, "10.0.0.1:80"))
        assert await receive(agent) == DialRequest(12, "10.0.0.1:80")
        assert stack.server.registry.is_ready()


def test_recorded_metric_names_exist_in_ours() -> None:
    from proxy_server.metrics import ServerMetrics

    ours = ServerMetrics().render().decode()
    recorded = (INTEROP / "server-metrics.prom").read_text()
    names = {line.split()[2] for line in recorded.splitlines() if line.startswith("# TYPE konnectivity")}
    for name in names:
        assert f"# TYPE {name} " in ours, name
    types = {line.split()[2]: line.split()[3] for line in recorded.splitlines() if line.startswith("# TYPE konnectivity")}
    for name, kind in types.items():
        assert f"# TYPE {name} {kind}\n" in ours
