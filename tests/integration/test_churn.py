"""Churn: hundreds of mixed tunnels opened and ended every way a client ends them, at once.

Downloads read all, part or none of what the endpoint sends and then close, or cancel
their stream without a close; uploads send bursts and close without reading the echo. Half
dial single-use, half over one reusable connection; most connections grow past the
own-stream threshold and many end while moving onto their own stream. Afterwards nothing
may be left anywhere (tables, links, connection tasks, writers) and nothing may have been
logged above INFO: each of these checks once caught a real bug at this size.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from proxy_common.certs import DemoPki
from proxy_common.client import Tunnel, TunnelClient, open_tunnel
from tests.harness import RunningAgent, Stack, echo_handler, endpoint, source_handler, wait_for

pytestmark = pytest.mark.integration
TUNNELS = 400
AT_ONCE = 64


async def _one(index: int, rnd: random.Random, stack: Stack, client: TunnelClient, source: str, echo: str) -> None:
    download = rnd.random() < 0.5
    target = source if download else echo
    tunnel: Tunnel = await (open_tunnel(target, uds_path=stack.uds) if index % 2 else client.dial(target))
    try:
        if download:
            wanted = rnd.choice([0, 1, 64 << 10, 300_000, 1 << 20])
            got = 0
            while got < wanted and (chunk := await tunnel.receive()):
                got += len(chunk)
            if rnd.random() < 0.3:
                tunnel._stream.cancel()  # the client goes without a CLOSE_REQ
        else:
            for _ in range(rnd.randint(0, 5)):
                await tunnel.send(b"x" * rnd.randint(1, 100_000))
                await asyncio.sleep(rnd.random() * 0.01)
    finally:
        await tunnel.aclose()


async def _settled(stack: Stack, running: RunningAgent) -> None:
    """Tables empty, and no agent connection task waits on anything (a goodbye may still be
    finishing: bounded)."""
    await stack.wait_idle(timeout=30)
    sessions = list(running.agent.clients.sessions.values())
    await wait_for(lambda: sum(len(s.endpoints) for s in sessions) == 0, what="agent connection tasks to end")


@pytest.mark.parametrize("flow_upgrade_bytes", [64 << 10, 0])
async def test_mixed_churn_leaves_nothing_behind_and_logs_nothing_alarming(
    stack: Stack, caplog: pytest.LogCaptureFixture, flow_upgrade_bytes: int
) -> None:
    caplog.set_level(logging.WARNING)
    running = await stack.add_agent(flow_upgrade_bytes=flow_upgrade_bytes)
    rnd = random.Random(flow_upgrade_bytes + 7)
    gate = asyncio.Semaphore(AT_ONCE)
    async with (
        endpoint(source_handler(1 << 20)) as src,
        endpoint(echo_handler) as ep,
        TunnelClient.over_uds(stack.uds) as client,
    ):

        async def bounded(index: int) -> None:
            async with gate, asyncio.timeout(30):
                await _one(index, rnd, stack, client, src.address, ep.address)

        async with asyncio.timeout(120):
            await asyncio.gather(*(bounded(i) for i in range(TUNNELS)))
        await _settled(stack, running)  # before the endpoints go: they must not see the end
    board = stack.server.board
    assert not board.frontends and not board.connection_links
    service = stack.server._proxy_servicer
    assert service is not None and not service._writing
    alarming = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert alarming == []


async def _one_connect(rnd: random.Random, uds: str, source: str, echo: str) -> None:
    download = rnd.random() < 0.5
    reader, writer = await asyncio.open_unix_connection(uds)
    try:
        writer.write(f"CONNECT {source if download else echo} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        if download:
            wanted = rnd.choice([0, 1, 64 << 10, 300_000, 1 << 20])
            got = 0
            while got < wanted and (chunk := await reader.read(1 << 16)):
                got += len(chunk)
            if rnd.random() < 0.3:
                writer.transport.abort()  # a reset instead of a close
        else:
            for _ in range(rnd.randint(0, 5)):
                writer.write(b"x" * rnd.randint(1, 100_000))
                await writer.drain()
                await asyncio.sleep(rnd.random() * 0.01)
    finally:
        writer.close()


async def test_http_connect_churn_leaves_nothing_behind_and_logs_nothing_alarming(
    pki: DemoPki, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    stack = await Stack(pki, short_tmp, mode="http-connect").start()
    try:
        running = await stack.add_agent()
        rnd = random.Random(11)
        gate = asyncio.Semaphore(AT_ONCE)
        async with endpoint(source_handler(1 << 20)) as src, endpoint(echo_handler) as ep:

            async def bounded() -> None:
                async with gate, asyncio.timeout(30):
                    await _one_connect(rnd, stack.uds, src.address, ep.address)

            async with asyncio.timeout(120):
                await asyncio.gather(*(bounded() for _ in range(TUNNELS)))
            await _settled(stack, running)
        assert not stack.server.board.frontends and not stack.server.board.connection_links
        alarming = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
        assert alarming == []
    finally:
        await stack.stop()
