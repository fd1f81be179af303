"""One slow or stalled connection never slows the others, and memory stays bounded.

Between our own server and agent each connection has its own gRPC stream (negotiated), so a
stalled reader stops only its own sender and resumes without losing a byte. With a peer that
speaks only the reference protocol (our agent forced to plain mode), a connection whose
buffer stays full past the bounded wait is closed on its own and counted.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from proxy_common.client import Tunnel, open_tunnel
from tests.harness import Stack, endpoint, expected_sha256, source_handler, wait_for

pytestmark = pytest.mark.integration
ACTIVE = 20
ACTIVE_BYTES = 4 << 20
STALLED_BYTES = 64 << 20


async def drain(tunnel: Tunnel) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := await tunnel.receive():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


async def run_active(stack: Stack, address: str) -> list[tuple[int, str]]:
    async def one() -> tuple[int, str]:
        async with await open_tunnel(address, uds_path=stack.uds) as tunnel:
            return await drain(tunnel)

    async with asyncio.timeout(60):
        return await asyncio.gather(*(one() for _ in range(ACTIVE)))


def agent_buffered(stack: Stack) -> int:
    """The agents' buffered-bytes gauge, read the way a scrape reads it."""
    name = "konnectivity_network_proxy_agent_buffered_bytes"
    return sum(int(running.agent.metrics.registry.get_sample_value(name) or 0) for running in stack.agents)


def server_buffered(stack: Stack) -> int:
    return int(stack.server.metrics.registry.get_sample_value("konnectivity_network_proxy_server_buffered_bytes") or 0)


async def test_stalled_reader_does_not_slow_the_others_and_resumes_intact(stack: Stack) -> None:
    running = await stack.add_agent()
    assert all(s.flow_token for s in running.agent.clients.sessions.values()), "flow control was not negotiated"
    async with endpoint(source_handler(STALLED_BYTES, b"stalled")) as slow_source, endpoint(source_handler(ACTIVE_BYTES)) as source:
        stalled = await open_tunnel(slow_source.address, uds_path=stack.uds)
        first = await stalled.receive()  # it flows, then its reader stops
        results = await run_active(stack, source.address)
        assert results == [(ACTIVE_BYTES, expected_sha256(ACTIVE_BYTES))] * ACTIVE
        # The stalled connection is still open and loses nothing once its reader returns.
        size, _ = len(first), None
        digest = hashlib.sha256(first)
        async with asyncio.timeout(60):
            while chunk := await stalled.receive():
                digest.update(chunk)
                size += len(chunk)
        assert size == STALLED_BYTES
        assert digest.hexdigest() == expected_sha256(STALLED_BYTES, b"stalled")
        await stalled.aclose()
    assert stack.server.metrics.overflow_closes._value.get() == 0
    await stack.wait_idle()


async def test_plain_protocol_closes_only_the_stalled_connection_after_the_wait(pki, short_tmp) -> None:
    stack = await Stack(pki, short_tmp, overflow_wait=1.0, frontend_buffer_bytes=1 << 20).start()
    try:
        running = await stack.add_agent(flow_control=False)
        assert not any(s.flow_token for s in running.agent.clients.sessions.values())
        async with endpoint(source_handler(STALLED_BYTES, b"stalled")) as slow_source, endpoint(source_handler(ACTIVE_BYTES)) as source:
            stalled = await open_tunnel(slow_source.address, uds_path=stack.uds)
            assert await stalled.receive()
            results = await run_active(stack, source.address)
            assert results == [(ACTIVE_BYTES, expected_sha256(ACTIVE_BYTES))] * ACTIVE
            await wait_for(lambda: stack.server.metrics.overflow_closes._value.get() == 1, what="overflow close")
            # Its reader comes back to a connection that ended early (never a silent gap).
            size, _ = await drain(stalled)
            assert size < STALLED_BYTES
            assert stalled.close_error == "connection closed: client stopped reading"
            await stalled.aclose()
        await stack.wait_idle()
    finally:
        await stack.stop()


@pytest.mark.parametrize("flow_control", [True, False], ids=["flow", "plain"])
async def test_buffers_stay_under_their_caps_while_a_reader_stalls(pki, short_tmp, flow_control: bool) -> None:
    cap = 1 << 20
    stack = await Stack(pki, short_tmp, frontend_buffer_bytes=cap, overflow_wait=30.0).start()
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        block = bytes(256 << 10)
        while sent < 4 << 30:  # several GiB offered; backpressure must stop it early
            writer.write(block)
            await writer.drain()
            sent += len(block)

    try:
        await stack.add_agent(flow_control=flow_control, endpoint_buffer_bytes=cap, read_chunk_bytes=256 << 10)
        async with endpoint(endless) as ep:
            tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
            peak_server = peak_agent = 0
            loop = asyncio.get_running_loop()
            settled_at = loop.time() + 2.0
            last_sent = -1
            while loop.time() < settled_at or sent != last_sent:
                last_sent = sent
                await asyncio.sleep(0.1)
                peak_server = max(peak_server, server_buffered(stack))
                peak_agent = max(peak_agent, agent_buffered(stack))
                if loop.time() > settled_at + 10:
                    break
            assert sent == last_sent, "the source never stopped: no backpressure"
            assert peak_server > 0, "the gauge saw nothing buffered: the measurement is broken"
            # Bounded: each mailbox on the path holds at most its cap plus one chunk.
            assert peak_server <= 2 * (cap + (256 << 10)), peak_server
            assert peak_agent <= cap + (256 << 10), peak_agent
            assert sent < 64 << 20, f"{sent >> 20} MiB left the source with nobody reading"
            await tunnel.aclose()
        await stack.wait_idle()
    finally:
        await stack.stop()


async def test_operator_stall_timeout_closes_a_reader_that_never_returns(pki, short_tmp) -> None:
    stack = await Stack(pki, short_tmp, stalled_connection_timeout=1.0, frontend_buffer_bytes=1 << 20).start()
    try:
        await stack.add_agent()
        async with endpoint(source_handler(STALLED_BYTES)) as source:
            stalled = await open_tunnel(source.address, uds_path=stack.uds)
            assert await stalled.receive()
            await wait_for(lambda: stack.server.metrics.overflow_closes._value.get() == 1, what="stall timeout close")
            size, _ = await drain(stalled)
            assert size < STALLED_BYTES
            await stalled.aclose()
        await stack.wait_idle()
    finally:
        await stack.stop()
