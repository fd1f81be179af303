"""Composition root of proxy-agent.

ROOT. `ProxyAgent` is what tests and the demo start in-process; `serve()` is what the
command line runs: the first SIGTERM drains (DRAIN to every server, no new server
connections, open connections may finish), a second one exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

from proxy_agent import debug
from proxy_agent import leases as lease_counting
from proxy_agent.config import AgentConfig
from proxy_agent.metrics import AgentMetrics
from proxy_agent.sessions import ClientSet
from proxy_common import probes
from proxy_common.errors import ConfigError
from proxy_common.tasks import race, two_stage_signals

log = logging.getLogger("proxy_agent")


class ProxyAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        # --count-server-leases: raises ConfigError here when the API configuration is unusable.
        self.lease_counter = lease_counting.build(config, self.metrics) if config.count_server_leases else None
        self.clients = ClientSet(config, self.metrics, lease_counter=self.lease_counter)
        self.metrics.buffered_bytes.set_function(self.clients.buffered_bytes)
        self.metrics.data_bytes.live = self._live_bytes
        self.metrics_page = probes.MetricsPage(self.metrics.render, self.metrics.registry)
        self._probes: list[probes.ProbeServer] = []
        self.health_port_bound = 0
        self.admin_port_bound = 0

    def open_connections(self) -> int:
        return sum(len(s.endpoints) for s in self.clients.sessions.values())

    async def run(self) -> None:
        """Serve the health and admin listeners and keep the server streams, until cancelled."""
        try:
            await self.start_probes()
            if self.lease_counter is None:
                await self.clients.run()
            else:
                # Side by side: an unreachable API never delays the first server connection (until the
                # first list answers, the target is 1, as the reference's informer starts empty).
                await race(self.clients.run(), self.lease_counter.run(),
                           names=("agent-client-set", "agent-lease-counter"))
        finally:
            await self.stop_probes()
            if self.lease_counter is not None:
                await self.lease_counter.aclose()

    async def start_probes(self) -> None:
        c = self.config
        health = probes.ProbeServer(
            "health", probes.agent_health_routes(self.clients.is_connected, self.metrics_page),
            host=c.health_server_host, port=c.health_server_port,
        )
        await health.start()
        self._probes.append(health)
        admin = probes.ProbeServer(
            "admin", probes.agent_admin_routes(health.port, debug.sources(self.clients)),
            host=c.admin_bind_address, port=c.admin_server_port,
        )
        await admin.start()
        self._probes.append(admin)
        self.health_port_bound, self.admin_port_bound = health.port, admin.port

    async def stop_probes(self) -> None:
        while self._probes:
            await self._probes.pop().aclose()

    def _live_bytes(self) -> Iterator[tuple[str, int]]:
        for session in self.clients.sessions.values():
            for endpoint in session.endpoints.values():
                yield "server_to_endpoint", endpoint.bytes_in
                yield "endpoint_to_server", endpoint.bytes_out

    async def wait_drained(self, grace: float) -> None:
        """Wait until no endpoint connection is open, or `grace` seconds (0: forever)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace if grace > 0 else None
        while self.open_connections() and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.1)


async def serve(config: AgentConfig) -> int:
    try:
        agent = ProxyAgent(config)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    draining = asyncio.Event()

    def first() -> None:
        log.info("draining: DRAIN sent to every server, no new server connections or dials "
                 "open_connections=%d grace_seconds=%s", agent.open_connections(), config.drain_grace or "unbounded")
        agent.clients.drain()
        draining.set()

    def second() -> None:
        log.info("second signal: exiting now")
        os._exit(0)

    log.info("proxy-agent starting agent_id=%s servers=%s", config.agent_id, config.server_targets())
    with two_stage_signals(first, second):
        runner = asyncio.create_task(agent.run(), name="agent-client-set")
        signalled = asyncio.create_task(draining.wait(), name="agent-drain-signal")
        await asyncio.wait((runner, signalled), return_when=asyncio.FIRST_COMPLETED)
        if runner.done():  # it never ends by itself unless it failed (e.g. a port in use)
            signalled.cancel()
            await asyncio.gather(signalled, return_exceptions=True)
            error = runner.exception() if not runner.cancelled() else None
            log.error("proxy-agent failed error=%r", error)
            return 1
        await agent.wait_drained(config.drain_grace)
        log.info("drain over, closing open_connections=%d", agent.open_connections())
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            pass
    log.info("proxy-agent stopped")
    return 0
