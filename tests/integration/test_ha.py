"""Several proxy servers and several agents in one test (issue 8): HA discovery and counting.

Servers sit behind one loopback TCP balancer (tests/balancer.py), as behind a Service or an
L4 load balancer; agents dial only the balancer and must still end with exactly one stream
to every distinct server. Everything is real: grpc.aio servers and agents, TLS, TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from proxy_agent.sessions import Backoff
from proxy_common.certs import DemoPki
from proxy_common.client import TunnelClient, open_tunnel
from proxy_common.errors import AuthError
from proxy_server.app import ProxyServer
from tests.balancer import Balancer, balancer
from tests.harness import (
    RunningAgent,
    agent_config,
    agent_metric,
    agent_service_server,
    echo_handler,
    echo_once,
    endpoint,
    server_config,
    server_metric,
    wait_for,
)

pytestmark = pytest.mark.integration



class Cluster:
    """Servers (each with its own frontend socket) and agents, all stopped at the end."""

    def __init__(self, pki: DemoPki, tmp: Path) -> None:
        self.pki, self.tmp = pki, tmp
        self.servers: dict[str, ProxyServer] = {}
        self.agents: dict[str, RunningAgent] = {}
        self.balancers: list[Balancer] = []

    async def start_balancer(self, ports: list[int]) -> Balancer:
        """A balancer closed after the agents and servers (so agents never see it vanish first)."""
        running = await Balancer(ports).start()
        self.balancers.append(running)
        return running

    async def start_server(self, server_id: str, **overrides: Any) -> ProxyServer:
        directory = self.tmp / server_id
        directory.mkdir(exist_ok=True)
        server = ProxyServer(server_config(self.pki, directory, server_id=server_id, **overrides))
        await server.start()
        self.servers[server_id] = server
        return server

    async def stop_server(self, server_id: str) -> ProxyServer:
        server = self.servers.pop(server_id)
        await server.stop(0)
        return server

    def add_agent(self, agent_id: str, port: int, **overrides: Any) -> RunningAgent:
        running = RunningAgent(agent_config(self.pki, port, agent_id=agent_id, **overrides))
        self.agents[agent_id] = running
        return running

    def held(self, agent_id: str) -> set[str]:
        return set(self.agents[agent_id].agent.clients.sessions)

    def streams_per_agent(self, server_id: str) -> dict[str, int]:
        """How many Connect streams each agent has open to this server."""
        counts: dict[str, int] = {}
        for backend in self.servers[server_id].registry.backends():
            counts[backend.agent_id] = counts.get(backend.agent_id, 0) + 1
        return counts

    def fully_meshed(self) -> bool:
        """Every agent holds exactly one stream to every server, on both sides."""
        servers, agents = set(self.servers), set(self.agents)
        return all(self.held(a) == servers for a in agents) and all(
            self.streams_per_agent(s) == dict.fromkeys(agents, 1) for s in servers
        )

    async def aclose(self) -> None:
        for running in self.agents.values():
            await running.stop()
        for server in self.servers.values():
            await server.stop(0)
        for running in self.balancers:
            await running.aclose()


@pytest.fixture
async def cluster(pki: DemoPki, short_tmp: Path) -> AsyncIterator[Cluster]:
    running = Cluster(pki, short_tmp)
    try:
        yield running
    finally:
        await running.aclose()


# ------------------------------------------------------------------ three servers
async def test_three_servers_behind_one_address_every_agent_holds_one_stream_to_each(
    cluster: Cluster, pki: DemoPki
) -> None:
    for name in ("s1", "s2", "s3"):
        await cluster.start_server(name, server_count=3)
    ports = {name: server.agent_port for name, server in cluster.servers.items()}
    lb = await cluster.start_balancer(list(ports.values()))
    for agent_id in ("a1", "a2"):
        cluster.add_agent(agent_id, lb.port)
    await wait_for(cluster.fully_meshed, what="every agent connected once to every server", timeout=30)
    for server in cluster.servers.values():
        assert server_metric(server, "ready_backends", proxy_strategy="default") == 2
        assert server_metric(server, "grpc_connections", service_method="Connect") == 2
    for running in cluster.agents.values():
        assert agent_metric(running, "open_server_connections") == 3
        assert agent_metric(running, "known_server_count") == 3

    # Restart s2 on the same port with the same ID: agents reconnect to it, and only to it.
    before = {agent_id: dict(running.agent.clients.sessions) for agent_id, running in cluster.agents.items()}
    await cluster.stop_server("s2")
    await wait_for(lambda: all(cluster.held(a) == {"s1", "s3"} for a in cluster.agents), what="s2 streams gone", timeout=30)
    await cluster.start_server("s2", server_count=3, agent_port=ports["s2"])
    await wait_for(cluster.fully_meshed, what="agents back on the restarted s2", timeout=30)
    for agent_id, running in cluster.agents.items():
        sessions = running.agent.clients.sessions
        # The streams to s1 and s3 are the very same objects: never dropped or duplicated.
        assert sessions["s1"] is before[agent_id]["s1"] and sessions["s3"] is before[agent_id]["s3"]
        assert sessions["s2"] is not before[agent_id]["s2"]
        assert agent_metric(running, "open_server_connections") == 3
    for server in cluster.servers.values():
        assert server_metric(server, "ready_backends", proxy_strategy="default") == 2


async def test_a_restarted_server_is_found_again_with_sync_forever(cluster: Cluster) -> None:
    """With --sync-forever the agent keeps probing; duplicates are closed at once and no server
    ever holds two streams of one agent for long."""
    for name in ("s1", "s2"):
        await cluster.start_server(name, server_count=1)  # a count too low: only sync-forever finds both
    lb = await cluster.start_balancer([s.agent_port for s in cluster.servers.values()])
    cluster.add_agent("a1", lb.port, sync_forever=True)
    await wait_for(cluster.fully_meshed, what="both servers found despite servercount=1", timeout=30)
    attempts = cluster.agents["a1"].agent.clients.attempts
    await wait_for(lambda: cluster.agents["a1"].agent.clients.attempts >= attempts + 3, what="more sync rounds")
    await wait_for(cluster.fully_meshed, what="duplicates closed again", timeout=30)


# ------------------------------------------------------------ acceptance (issue 8)
async def test_two_servers_two_agents_every_dial_works_through_either_server(cluster: Cluster) -> None:
    for name in ("s1", "s2"):
        await cluster.start_server(name, server_count=2)
    lb = await cluster.start_balancer([s.agent_port for s in cluster.servers.values()])
    async with endpoint(echo_handler) as ep:
        for agent_id in ("a1", "a2"):
            cluster.add_agent(agent_id, lb.port)
        await wait_for(cluster.fully_meshed, what="2 agents x 2 servers", timeout=30)
        for server_id, server in cluster.servers.items():
            for i in range(6):
                payload = f"{server_id} dial {i}".encode()
                await echo_once(server.config.uds_name, ep.address, payload)
            # A reusable client (kube-apiserver's newer mode) on this server as well.
            async with TunnelClient.over_uds(server.config.uds_name) as client:
                tunnels = [await client.dial(ep.address) for _ in range(4)]
                for index, tunnel in enumerate(tunnels):
                    await tunnel.send(b"x%d" % index)
                    assert await tunnel.receive() == b"x%d" % index
                for tunnel in tunnels:
                    await tunnel.aclose()
        # Both agents carried dials from each server (the default strategy spreads them).
        carried = {a: agent_metric(r, "dial_duration_seconds_count") for a, r in cluster.agents.items()}
        assert sum(carried.values()) == 20 and all(count > 0 for count in carried.values()), carried
        await wait_for(lambda: ep.open_connections == 0, what="endpoint connections closed")
        for server in cluster.servers.values():
            await wait_for(server.router.is_empty, what="server tables empty")


async def test_an_agent_given_every_server_address_reaches_each_without_a_balancer(cluster: Cluster) -> None:
    for name in ("s1", "s2", "s3"):
        await cluster.start_server(name, server_count=1)  # servercount alone would stop at one
    addresses = tuple(f"127.0.0.1:{s.agent_port}" for s in cluster.servers.values())
    running = cluster.add_agent("a1", 1, proxy_server_addresses=addresses)
    await wait_for(cluster.fully_meshed, what="one stream per listed address", timeout=30)
    assert agent_metric(running, "known_server_count") == 3
    attempts = running.agent.clients.attempts
    assert attempts == 3, "each address tried once, none twice"


# ----------------------------------------------------------- second stream, one ID
async def test_a_second_stream_of_one_agent_id_keeps_the_first_streams_connections(cluster: Cluster) -> None:
    """Two agents with one ID on one server (a restarted pod racing its old self, or a
    reconnect before the old stream ended): the first stream's connection keeps working,
    closes cleanly, and every table ends empty, whichever stream leaves first."""
    server = await cluster.start_server("s1")
    async with endpoint(echo_handler) as ep:
        first = cluster.add_agent("same-id", server.agent_port)
        await wait_for(lambda: len(server.registry) == 1, what="first stream")
        tunnel = await open_tunnel(ep.address, uds_path=server.config.uds_name)
        assert first.connection_count() == 1
        second = RunningAgent(agent_config(cluster.pki, server.agent_port, agent_id="same-id"))
        try:
            await wait_for(lambda: len(server.registry) == 2, what="second stream of the same agent ID")
            assert server.registry.key_counts() == {"default": 1}  # one agent, two streams
            await tunnel.send(b"still here")
            assert await tunnel.receive() == b"still here"
            await second.stop()  # the second stream ends first: the first's connection is untouched
            await wait_for(lambda: len(server.registry) == 1, what="second stream gone")
            await tunnel.send(b"and now")
            assert await tunnel.receive() == b"and now"
        finally:
            await second.stop()
        await tunnel.aclose()
        assert tunnel.close_error == ""
        await wait_for(lambda: server.router.is_empty() and first.connection_count() == 0 and ep.open_connections == 0,
                       what="every table empty")
        assert server_metric(server, "established_connections") == 0


async def test_connections_on_the_second_stream_survive_the_first_streams_end(cluster: Cluster) -> None:
    """The other order: a connection carried by the second stream of an agent ID outlives the
    first stream (the reference keyed connections by agent ID and lost them here). destHost
    prefers a non-draining stream of the key, so draining the first steers the dial to the second."""
    server = await cluster.start_server("s1", proxy_strategies=("destHost",))
    async with endpoint(echo_handler) as ep:
        first = cluster.add_agent("same-id", server.agent_port, agent_identifiers="ipv4=127.0.0.1")
        await wait_for(lambda: len(server.registry) == 1, what="first stream")
        second = RunningAgent(agent_config(cluster.pki, server.agent_port, agent_id="same-id",
                                           agent_identifiers="ipv4=127.0.0.1"))
        try:
            await wait_for(lambda: len(server.registry) == 2, what="second stream of the same agent ID")
            first.agent.clients.drain()
            await wait_for(lambda: server.registry.backends()[0].draining, what="first stream draining")
            tunnel = await open_tunnel(ep.address, uds_path=server.config.uds_name)
            assert second.connection_count() == 1 and first.connection_count() == 0
            await first.stop()
            await wait_for(lambda: len(server.registry) == 1, what="first stream gone")
            await tunnel.send(b"on the second stream")
            assert await tunnel.receive() == b"on the second stream"
            await tunnel.aclose()
            assert tunnel.close_error == ""
            await wait_for(lambda: server.router.is_empty() and second.connection_count() == 0
                           and ep.open_connections == 0, what="every table empty")
        finally:
            await second.stop()


# ---------------------------------------------------------------- reconnect storm
def attempts_allowed(elapsed: float, base: float, cap: float, *, successes: int = 0) -> int:
    """The most connection attempts the back-off schedule permits in `elapsed` seconds: the
    first at once, then one after each wait, every wait at least its jitter-free value
    (`successes` first attempts that succeeded are followed by the plain sync interval)."""
    schedule = Backoff(base, cap)
    attempts, spent = 1, 0.0
    while True:
        if successes:
            successes -= 1
            spent += base
        else:
            spent += min(cap, base * 1.5**schedule.failures)
            schedule.failures += 1
        if spent > elapsed:
            return attempts
        attempts += 1


async def refuse(_md: object) -> None:
    raise AuthError("Failed to validate authentication token")


class AcceptThenDrop:
    """A Connect server that answers with good headers, then ends every stream a moment later
    (a server that crashes or retires streams at once): each stream counts as connected."""

    def __init__(self, pki: DemoPki) -> None:
        self.streams = 0
        self.server, self.port = agent_service_server(pki, self._connect)

    async def _connect(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.streams += 1
        await context.send_initial_metadata((("serverid", "flappy"), ("servercount", "1")))
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("case", ["servercount_unreachable", "auth_refused", "accepts_then_drops"])
async def test_a_server_that_keeps_refusing_gets_at_most_the_backoff_schedule(
    case: str, cluster: Cluster, pki: DemoPki, short_tmp: Path
) -> None:
    flappy: AcceptThenDrop | None = None
    if case == "accepts_then_drops":
        flappy = AcceptThenDrop(pki)
        await flappy.server.start()
        port = flappy.port
    elif case == "servercount_unreachable":
        # One server claims three: every later attempt lands on a server already held.
        port = (await cluster.start_server("s1", server_count=3)).agent_port
    else:
        directory = short_tmp / "refusing"
        directory.mkdir()
        server = ProxyServer(server_config(pki, directory, server_id="s1"), authenticate=refuse)
        cluster.servers["s1"] = server
        await server.start()
        port = server.agent_port
    try:
        base, cap = 0.05, 0.2
        lb = await cluster.start_balancer([port])
        loop = asyncio.get_running_loop()
        started = loop.time()
        cluster.add_agent("a1", lb.port, sync_interval=base, sync_interval_cap=cap)
        await wait_for(lambda: lb.accepted >= 10, what="ten attempts", timeout=20)
        elapsed = loop.time() - started
        count = lb.accepted
        # The first attempt against the lone server succeeds; only the refusals after it back off.
        allowed = attempts_allowed(elapsed, base, cap, successes=1 if case == "servercount_unreachable" else 0)
        # The Go agent would have made elapsed/base attempts; the back-off permits far fewer.
        assert count <= allowed, f"{count} attempts in {elapsed:.2f}s; the back-off allows {allowed}"
        clients = cluster.agents["a1"].agent.clients
        if case == "servercount_unreachable":
            assert len(clients.sessions) == 1
            assert clients.duplicate_streak >= 5  # and the likely cause was logged as a warning
        elif case == "accepts_then_drops":
            assert flappy is not None and flappy.streams >= 5 and clients.flaps >= 5
        else:
            assert not clients.sessions
    finally:
        await cluster.agents["a1"].stop()
        if flappy is not None:
            await flappy.server.stop(0)


async def test_the_backoff_schedule_bound_is_tight() -> None:
    """The bound used above: 1 + waits of 0.05, 0.075, 0.1125, 0.16875, then 0.2 capped."""
    assert attempts_allowed(0.049, 0.05, 0.2) == 1
    assert attempts_allowed(0.05, 0.05, 0.2) == 2
    assert attempts_allowed(0.05 + 0.075 + 0.1125 + 0.16875 + 0.2, 0.05, 0.2) == 6
    assert attempts_allowed(0.05 + 0.05, 0.05, 0.2, successes=1) == 3


async def test_balancer_counts_and_closes(pki: DemoPki) -> None:
    """The test balancer itself: round robin, refused backends counted, nothing left open."""
    async with endpoint(echo_handler) as ep, balancer([ep.port, 1]) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
        assert await reader.read() == b""  # port 1 refuses: closed at once
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert isinstance(lb, Balancer) and lb.forwarded[ep.port] == 1 and lb.refused[1] == 1
