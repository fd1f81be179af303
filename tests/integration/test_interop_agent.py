"""Our proxy-agent against a scripted server, replaying the Go agent's recorded transcript.

The recorder plays the proxy-server: it accepts the agent's Connect stream on a real TLS
port, answers with serverid/servercount headers and then sends the packets of
tests/interop/agent-transcript.json, checking the answers against what the Go agent sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from proxy_common import metadata
from proxy_common.certs import DemoPki
from proxy_common.messages import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Drain,
    Message,
)
from proxy_common.streams import ServerStream
from tests.harness import RunningAgent, agent_config, agent_service_server, echo_handler, endpoint, wait_for

pytestmark = pytest.mark.integration
TRANSCRIPT = json.loads((Path(__file__).parents[1] / "interop" / "agent-transcript.json").read_text())
HANDSHAKE = json.loads((Path(__file__).parents[1] / "interop" / "agent-handshake.json").read_text())
QUIET = 0.3


class Recorder:
    """A one-stream AgentService that the test drives packet by packet."""

    def __init__(self, pki: DemoPki, headers: tuple[tuple[str, str], ...]) -> None:
        self.pki = pki
        self.headers = headers
        self.invocation_metadata: list[tuple[str, str]] = []
        self.connects = 0
        self.to_agent: asyncio.Queue[Message | None] = asyncio.Queue()
        self.from_agent: asyncio.Queue[Message] = asyncio.Queue()
        self.server, self.port = agent_service_server(pki, self._connect)

    async def _connect(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.connects += 1
        self.invocation_metadata = [(k, v) for k, v in context.invocation_metadata() or ()]
        await context.send_initial_metadata(self.headers)
        stream = ServerStream(context)

        async def pump_out() -> None:
            while (message := await self.to_agent.get()) is not None:
                await stream.send(message)

        sender = asyncio.create_task(pump_out())
        try:
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    return
                from proxy_common import wire

                await self.from_agent.put(wire.decode(raw))
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    async def send(self, message: Message) -> None:
        await self.to_agent.put(message)

    async def expect(self, timeout: float = 5.0) -> Message:
        async with asyncio.timeout(timeout):
            return await self.from_agent.get()

    async def expect_quiet(self) -> None:
        with contextlib.suppress(TimeoutError):
            message = await asyncio.wait_for(self.from_agent.get(), QUIET)
            raise AssertionError(f"agent sent {message!r}, the Go agent sends nothing here")


@contextlib.asynccontextmanager
async def recorder_with_agent(pki: DemoPki, headers: tuple[tuple[str, str], ...] = (("serverid", "rec-server-1"), ("servercount", "1")), **agent: Any) -> AsyncIterator[tuple[Recorder, RunningAgent]]:
    recorder = Recorder(pki, headers)
    await recorder.server.start()
    running = RunningAgent(agent_config(pki, recorder.port, **agent))
    try:
        yield recorder, running
    finally:
        await running.stop()
        await recorder.server.stop(0)


def transcript_step(name: str) -> dict[str, Any]:
    return next(s for s in TRANSCRIPT["steps"] if s["name"] == name)


async def test_handshake_metadata_matches_the_go_agent(pki: DemoPki, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(HANDSHAKE["token_file"]["content"])
    identifiers = "host=node1.example.com&host=localhost&ipv4=10.0.0.5&ipv4=10.0.0.6&ipv6=fd00::5&cidr=10.0.0.0/24&default-route=true"
    async with recorder_with_agent(
        pki, agent_id="interop-agent-1", agent_identifiers=identifiers, service_account_token_path=str(token)
    ) as (recorder, running):
        await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
        md = {k: v for k, v in recorder.invocation_metadata if k != "user-agent"}
        go = dict(HANDSHAKE["metadata_seen_by_python_grpcio_invocation_metadata"])
        # Exactly the Go agent's headers, plus our capability offer, which Go servers ignore.
        assert md == {**{k: v for k, v in go.items() if k != "user-agent"}, "konnectivity-py-flow": "1"}
        assert [k for k, _ in recorder.invocation_metadata if k in go][-3:] == ["agentid", "agentidentifiers", "authorization"]
        # The agent sends nothing until the server does.
        await recorder.expect_quiet()


async def test_agent_without_identifiers_still_sends_the_header(pki: DemoPki) -> None:
    async with recorder_with_agent(pki) as (recorder, running):
        await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
        assert metadata.values(recorder.invocation_metadata, "agentidentifiers") == [""]
        assert metadata.values(recorder.invocation_metadata, "authorization") == []


async def test_transcript_dial_data_close_and_unknown_ids(pki: DemoPki) -> None:
    async with recorder_with_agent(pki) as (rec, running), endpoint(echo_handler) as echo:
        await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
        # 1: dial -> DIAL_RSP with the random echoed and connectID 1
        await rec.send(DialRequest(1001, echo.address))
        assert await rec.expect() == DialResponse(1001, conn_id=1)
        # 2: data is echoed back
        await rec.send(Data(1, b"hello interop\n"))
        assert await rec.expect() == Data(1, b"hello interop\n")
        # 3b: 100 KiB in one DATA comes back complete (in chunks of our size)
        payload = bytes(i % 256 for i in range(102400))
        await rec.send(Data(1, payload))
        got = b""
        while len(got) < len(payload):
            message = await rec.expect()
            assert isinstance(message, Data) and message.conn_id == 1
            got += message.data
        assert got == payload
        # 4, 5: close, then close again
        await rec.send(CloseRequest(1))
        assert await rec.expect() == CloseResponse(1)
        await rec.send(CloseRequest(1))
        assert await rec.expect() == CloseResponse(1, "Unknown connectID")
        # 6: refused dial uses up connectID 2
        await rec.send(DialRequest(1002, "127.0.0.1:1"))
        assert await rec.expect() == DialResponse(1002, error="dial tcp 127.0.0.1:1: connect: connection refused")
        # 7, 8, 9, 10, 10b
        await rec.send(Data(999, b"x"))
        assert await rec.expect() == CloseResponse(999, "unrecognized connectID")
        await rec.send(Data(0, b"x"))
        await rec.expect_quiet()
        await rec.send(CloseRequest(12345))
        assert await rec.expect() == CloseResponse(12345, "Unknown connectID")
        await rec.send(CloseDial(1003))
        await rec.send(DialResponse(4242, conn_id=5))
        await rec.expect_quiet()
        # 11: the next dial gets connectID 3 (the failed dial used 2)
        await rec.send(DialRequest(1004, echo.address))
        assert await rec.expect() == DialResponse(1004, conn_id=3)
        await rec.send(CloseRequest(3))
        assert await rec.expect() == CloseResponse(3)
        await wait_for(lambda: echo.open_connections == 0, what="endpoint closed")


async def test_transcript_remote_close_sends_data_then_close(pki: DemoPki) -> None:
    async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(b"pong\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"bye\n")

    async with recorder_with_agent(pki) as (rec, running), endpoint(bye) as ep:
        await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
        await rec.send(DialRequest(1004, ep.address))
        assert await rec.expect() == DialResponse(1004, conn_id=1)
        await rec.send(Data(1, b"ping\n"))
        received = b""
        while True:
            message = await rec.expect()
            if isinstance(message, CloseResponse):
                break
            assert isinstance(message, Data)
            received += message.data
        assert received == b"pong\nbye\n"
        assert message == CloseResponse(1)
        # 14: data to the closed connection
        await rec.send(Data(1, b"late\n"))
        assert await rec.expect() == CloseResponse(1, "unrecognized connectID")


async def test_transcript_half_close_is_a_full_close(pki: DemoPki) -> None:
    async def shut_write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write_eof()
        await reader.read()

    async with recorder_with_agent(pki) as (rec, running), endpoint(shut_write) as ep:
        await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
        await rec.send(DialRequest(7, ep.address))
        assert await rec.expect() == DialResponse(7, conn_id=1)
        assert await rec.expect() == CloseResponse(1)
        await wait_for(lambda: ep.open_connections == 0, what="endpoint closed by the agent")


@pytest.mark.parametrize(
    ("protocol", "address", "error"),
    [
        ("tcp", "127.0.0.1", "dial tcp: address 127.0.0.1: missing port in address"),
        ("bogus", "127.0.0.1:18300", "dial bogus: unknown network bogus"),
        ("", "127.0.0.1:18300", "dial: unknown network "),
        ("tcp", "localhost:1", "dial tcp 127.0.0.1:1: connect: connection refused"),
    ],
)
async def test_transcript_dial_error_texts(pki: DemoPki, protocol: str, address: str, error: str) -> None:
    async with recorder_with_agent(pki) as (rec, running):
        await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
        await rec.send(DialRequest(1006, address, protocol))
        answer = await rec.expect()
        assert isinstance(answer, DialResponse) and answer.conn_id == 0
        if address.startswith("localhost"):
            assert answer.error in {error, "dial tcp [::1]:1: connect: connection refused"}
        else:
            assert answer.error == error


async def test_recorded_go_answers_match_ours(pki: DemoPki) -> None:
    """The recorded error strings are the ones our table emits."""
    recorded = {
        p["decoded"]["closeResponse"].get("error")
        for step in TRANSCRIPT["steps"]
        for p in step.get("received_from_agent", [])
        if p.get("decoded", {}).get("type") == "CLOSE_RSP"
    }
    assert recorded == {None, "Unknown connectID", "unrecognized connectID"}


async def test_drain_is_sent_on_every_stream_with_its_payload(pki: DemoPki) -> None:
    async with recorder_with_agent(pki) as (rec, running):
        await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
        running.agent.clients.drain()
        assert await rec.expect() == Drain()


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ((("servercount", "1"),), "no serverid"),
        ((("serverid", "x"),), "no servercount"),
        ((("serverid", "x"), ("servercount", "abc")), "servercount not a number"),
    ],
)
async def test_agent_refuses_servers_without_valid_headers(pki: DemoPki, headers: tuple[tuple[str, str], ...], why: str) -> None:
    async with recorder_with_agent(pki, headers) as (rec, running):
        await wait_for(lambda: rec.connects >= 2, what=f"agent to retry ({why})")
        assert not running.agent.clients.is_connected()


async def test_servercount_zero_is_treated_as_one(pki: DemoPki) -> None:
    async with recorder_with_agent(pki, (("serverid", "x"), ("servercount", "0"))) as (_rec, running):
        await wait_for(lambda: running.agent.clients.is_connected(), what="agent connected")
        assert running.agent.clients.target_count == 1
