"""Proxy strategies end to end (issue 8): several real agents with identifiers on one server.

Which agent got a dial is read from that agent's own counters (DIAL_REQ packets received),
so every assertion is about where the server really sent the dial.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy_agent.connections import DRAINING_ERROR
from proxy_common.certs import DemoPki
from proxy_common.client import TunnelDialError, open_tunnel
from proxy_server.app import ProxyServer
from tests.harness import RunningAgent, agent_config, echo_handler, endpoint, server_config, wait_for

pytestmark = pytest.mark.integration

AGENTS = {
    "agent-a": "ipv4=127.0.0.2",
    "agent-b": "ipv4=127.0.0.3&host=localhost",
    "agent-c": "cidr=127.0.0.0%2F8",  # stored, but no strategy uses CIDRs (as in the reference)
    "agent-d": "default-route=true",
}


class Site:
    def __init__(self, server: ProxyServer, agents: dict[str, RunningAgent]) -> None:
        self.server, self.agents = server, agents

    def dials(self) -> dict[str, int]:
        """DIAL_REQ packets each agent has received so far."""
        return {
            name: int(running.agent.metrics.registry.get_sample_value(
                "konnectivity_network_proxy_agent_stream_packets_total",
                {"segment": "to_agent", "packet_type": "DIAL_REQ"}) or 0)
            for name, running in self.agents.items()
        }

    async def dial_lands_on(self, address: str) -> tuple[str, str]:
        """Dial once; (the agent that got it, the dial error or "")."""
        before = self.dials()
        error = ""
        try:
            tunnel = await open_tunnel(address, uds_path=self.server.config.uds_name)
        except TunnelDialError as exc:
            error = str(exc)
        else:
            await tunnel.aclose()
        after = self.dials()
        moved = [name for name in after if after[name] != before[name]]
        assert len(moved) <= 1, moved
        return (moved[0] if moved else ""), error


@contextlib.asynccontextmanager
async def site(pki: DemoPki, tmp: Path, strategies: tuple[str, ...], agents: dict[str, str]) -> AsyncIterator[Site]:
    server = ProxyServer(server_config(pki, tmp, proxy_strategies=strategies))
    await server.start()
    running: dict[str, RunningAgent] = {}
    try:
        for name, identifiers in agents.items():
            running[name] = RunningAgent(agent_config(pki, server.agent_port, agent_id=name,
                                                      agent_identifiers=identifiers))
        await wait_for(lambda: len(server.registry) == len(agents), what="every agent registered")
        yield Site(server, running)
        await wait_for(server.router.is_empty, what="server tables empty")
    finally:
        for agent in running.values():
            await agent.stop()
        await server.stop(0)


async def test_dest_host_routes_by_identifier_and_falls_through_to_default(pki: DemoPki, short_tmp: Path) -> None:
    async with site(pki, short_tmp, ("destHost", "default"), AGENTS) as s, \
            endpoint(echo_handler, "127.0.0.2") as ep_a, endpoint(echo_handler, "127.0.0.3") as ep_b:
        registry = s.server.metrics.registry
        assert registry.get_sample_value("konnectivity_network_proxy_server_ready_backends",
                                         {"proxy_strategy": "destHost"}) == 3  # 127.0.0.2, 127.0.0.3, localhost
        assert registry.get_sample_value("konnectivity_network_proxy_server_ready_backends",
                                         {"proxy_strategy": "default"}) == 4
        # Each agent's own addresses land on it, every time, and the bytes come back.
        for _ in range(5):
            assert await s.dial_lands_on(ep_a.address) == ("agent-a", "")
            assert await s.dial_lands_on(ep_b.address) == ("agent-b", "")
        async with await open_tunnel(ep_a.address, uds_path=s.server.config.uds_name) as tunnel:
            await tunnel.send(b"via a")
            assert await tunnel.receive() == b"via a"
        # A host identifier: the agent that advertised it gets the dial (nothing listens there: refused).
        landed, error = await s.dial_lands_on("localhost:1")
        assert landed == "agent-b" and error.endswith(":1: connect: connection refused"), error
        # Unknown destinations (a CIDR match is not enough) fall to `default`: spread over all four.
        seen = dict.fromkeys(AGENTS, 0)
        for _ in range(48):
            landed, error = await s.dial_lands_on("127.0.0.9:1")
            assert error == "dial tcp 127.0.0.9:1: connect: connection refused"
            seen[landed] += 1
        assert all(count > 0 for count in seen.values()), seen


async def test_default_route_takes_unknown_destinations_and_then_no_agent(pki: DemoPki, short_tmp: Path) -> None:
    async with site(pki, short_tmp, ("destHost", "defaultRoute"), AGENTS) as s, endpoint(echo_handler, "127.0.0.2") as ep_a:
        for _ in range(10):
            assert (await s.dial_lands_on("127.0.0.9:1"))[0] == "agent-d"
        assert (await s.dial_lands_on(ep_a.address)) == ("agent-a", "")
        await s.agents.pop("agent-d").stop()
        await wait_for(lambda: len(s.server.registry) == 3, what="agent-d gone")
        # No strategy can place it now: the reference's error, and no agent got a DIAL_REQ.
        assert await s.dial_lands_on("127.0.0.9:1") == ("", "No agent available")
        assert s.server.metrics.dial_failures.value("no_agent") == 1
        assert (await s.dial_lands_on(ep_a.address)) == ("agent-a", "")


async def test_readiness_follows_the_first_strategy_only(pki: DemoPki, short_tmp: Path) -> None:
    only_default_route = {"agent-d": AGENTS["agent-d"]}
    async with site(pki, short_tmp, ("destHost", "default"), only_default_route) as s:
        assert not s.server.registry.is_ready()  # no ipv4/ipv6/host identifier yet
        assert (await s.dial_lands_on("127.0.0.9:1"))[0] == "agent-d"  # yet `default` still places dials
    async with site(pki, short_tmp, ("defaultRoute", "default"), only_default_route) as s:
        assert s.server.registry.is_ready()


async def test_a_draining_agent_is_avoided_while_another_fits(pki: DemoPki, short_tmp: Path) -> None:
    async with site(pki, short_tmp, ("default",), {"agent-a": "", "agent-b": ""}) as s:
        s.agents["agent-a"].agent.clients.drain()
        await wait_for(lambda: all(b.draining for b in s.server.registry.backends() if b.agent_id == "agent-a"),
                       what="agent-a draining on the server")
        for _ in range(20):
            assert (await s.dial_lands_on("127.0.0.9:1"))[0] == "agent-b"
        assert s.server.registry.is_ready()
        # Only the draining agent left: as in the reference the server still sends it the dial;
        # ours refuses it without dialing (the Go agent would dial).
        await s.agents.pop("agent-b").stop()
        await wait_for(lambda: len(s.server.registry) == 1, what="agent-b gone")
        assert s.server.registry.is_ready()  # draining agents still count for readiness
        assert await s.dial_lands_on("127.0.0.9:1") == ("agent-a", DRAINING_ERROR)
