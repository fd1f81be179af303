"""The Proxy stream's on-demand writer against real grpc: interleavings a review found.

The writer task exists only while there is something to write toward the client, so the
races worth testing are the ones where a packet for the client arrives in the same loop
turn as the end of the stream. These tests reach into the in-process server to make such
a turn happen for sure (real grpc, real sockets, no stand-ins)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from proxy_common import client as client_module
from proxy_common.client import TunnelClient, TunnelDialError, open_tunnel
from proxy_common.messages import Data
from proxy_server import frontend_service
from proxy_server.frontend_service import ProxyServicer
from tests.harness import Stack, echo_handler, endpoint, wait_for

pytestmark = pytest.mark.integration


def servicer(stack: Stack) -> ProxyServicer:
    service = stack.server._proxy_servicer
    assert service is not None
    return service


def proxy_rpc_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if "/ProxyService/Proxy" in t.get_name()]


async def idle_tunnel(stack: Stack, client: TunnelClient, address: str) -> object:
    tunnel = await client.dial(address)
    await tunnel.send(b"hi")
    assert await tunnel.receive() == b"hi"
    await wait_for(lambda: not servicer(stack)._writing, what="the writer to retire")
    return tunnel


async def test_a_packet_in_the_same_turn_as_the_rpc_cancel_leaves_no_writer_behind(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer started for the packet is cancelled before its first step, so its own
    # cleanup never runs: stop() must do it, or the stream stays in the sweep's set for good.
    monkeypatch.setattr(frontend_service, "IDLE_WRITER_SECONDS", 0.05)
    monkeypatch.setattr(client_module, "CLOSE_TIMEOUT_SECONDS", 0.2)  # its server side is gone
    await stack.add_agent()
    async with endpoint(echo_handler) as ep, TunnelClient.over_uds(stack.uds) as client:
        tunnel = await idle_tunnel(stack, client, ep.address)
        (link,) = stack.server.board.frontends.values()
        (rpc,) = proxy_rpc_tasks()
        rpc.cancel()  # as grpc does when the client cancels
        link.mailbox.force(Data(1, b"late"))  # and the agent's packet lands in the same turn
        await wait_for(lambda: not stack.server.board.frontends, what="the frontend to close")
        assert not servicer(stack)._writing
        # nothing left to sweep: the timer runs out and is not re-armed
        await wait_for(lambda: servicer(stack)._sweep is None, what="the sweep timer to stop")
        await tunnel.aclose()  # type: ignore[attr-defined]
    await stack.wait_idle()


async def test_no_sweep_is_armed_after_the_servicer_closed(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(echo_handler) as ep, TunnelClient.over_uds(stack.uds) as client:
        tunnel = await idle_tunnel(stack, client, ep.address)
        (link,) = stack.server.board.frontends.values()
        servicer(stack).close()  # the server is stopping
        link.mailbox.force(Data(1, b"late"))  # a last packet still starts a writer (inside force) ...
        assert servicer(stack)._sweep is None  # ... but no timer outlives the server
        await tunnel.aclose()  # type: ignore[attr-defined]
    await stack.wait_idle()


async def test_a_finished_stream_is_freed_without_the_cycle_collector(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(echo_handler) as ep, TunnelClient.over_uds(stack.uds) as client:
        gc.collect()
        gc.disable()
        try:
            tunnel = await client.dial(ep.address)
            await tunnel.send(b"hi")
            assert await tunnel.receive() == b"hi"
            await tunnel.aclose()
            await wait_for(lambda: not stack.server.board.frontends, what="the frontend to close")
            await wait_for(lambda: not proxy_rpc_tasks(), what="the RPC to end")
            alive = [o for o in gc.get_objects() if type(o) is frontend_service._Frontend]
            assert alive == []
        finally:
            gc.enable()
    await stack.wait_idle()


async def test_a_bug_in_the_writer_fails_the_stream_with_internal(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: object) -> list[object]:
        raise RuntimeError("injected writer bug")

    monkeypatch.setattr(frontend_service, "split_data", broken)
    await stack.add_agent()
    async with endpoint(echo_handler) as ep:
        with pytest.raises(TunnelDialError, match="INTERNAL"):
            await open_tunnel(ep.address, uds_path=stack.uds, timeout=5)
    assert "injected writer bug" in caplog.text
    await stack.wait_idle()
