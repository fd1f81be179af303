"""End to end through the client library, the Unix socket, the server, TLS and an agent."""

from __future__ import annotations

import pytest

from proxy_common.client import TunnelDialError, open_tunnel
from tests.harness import Stack, echo_handler, endpoint


async def test_echo_through_tunnel(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(echo_handler) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        await tunnel.send(b"hello")
        assert await tunnel.receive() == b"hello"
        await tunnel.aclose()


async def test_refused_dial_returns_reference_text(stack: Stack) -> None:
    await stack.add_agent()
    with pytest.raises(TunnelDialError, match=r"^dial tcp 127\.0\.0\.1:1: connect: connection refused$"):
        await open_tunnel("127.0.0.1:1", uds_path=stack.uds)
