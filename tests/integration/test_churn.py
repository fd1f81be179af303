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

import pytest

from proxy_common.client import Tunnel, TunnelClient, open_tunnel
from tests.harness import Stack, echo_handler, endpoint, source_handler, wait_for

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
    await stack.wait_idle(timeout=30)
    board = stack.server.board
    sessions = list(running.agent.clients.sessions.values())
    assert not board.frontends and not board.connection_links
    # no connection task waits on anything (a goodbye may still be finishing: bounded)
    await wait_for(lambda: sum(len(s.endpoints) for s in sessions) == 0, what="agent connection tasks to end")
    service = stack.server._proxy_servicer
    assert service is not None and not service._writing
    alarming = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert alarming == []
