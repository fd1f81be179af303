"""Lease-based server counting end to end, through the real `kubernetes` client against the
kube-apiserver stand-in (tests/fakekube.py): servers publish, renew and cull Leases and
delete their own on shutdown; agents with --count-server-leases follow servers appearing
and disappearing. Durations are shortened through config fields (the flags keep 30 s/15 s).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy_agent import debug
from proxy_common.certs import DemoPki
from proxy_common.errors import ConfigError
from proxy_server.app import ProxyServer
from tests.balancer import Balancer
from tests.fakekube import FakeKube
from tests.harness import RunningAgent, agent_config, agent_metric, server_config, server_metric, wait_for

pytestmark = pytest.mark.integration

NS = "kube-system"
LABELS = {"k8s-app": "konnectivity-server"}
FAST_LEASES = {"lease_duration_seconds": 2, "lease_renew_interval": 0.3, "lease_gc_interval": 0.3,
               "lease_api_timeout": 5.0}


@pytest.fixture
def fake(pki: DemoPki) -> Iterator[FakeKube]:
    with FakeKube(pki) as kube_api:
        yield kube_api


@pytest.fixture
def kubeconfig(fake: FakeKube, tmp_path: Path) -> str:
    return str(fake.write_kubeconfig(tmp_path / "kubeconfig"))


class Fleet:
    def __init__(self, pki: DemoPki, tmp: Path, kubeconfig: str) -> None:
        self.pki, self.tmp, self.kubeconfig = pki, tmp, kubeconfig
        self.servers: dict[str, ProxyServer] = {}
        self.agents: list[RunningAgent] = []
        self.balancer: Balancer | None = None

    async def start_server(self, server_id: str, **overrides: Any) -> ProxyServer:
        directory = self.tmp / server_id
        directory.mkdir(exist_ok=True)
        fields = {"enable_lease_controller": True, "kubeconfig": self.kubeconfig, **FAST_LEASES, **overrides}
        server = ProxyServer(server_config(self.pki, directory, server_id=server_id, **fields))
        self.servers[server_id] = server
        await server.start()
        return server

    async def stop_server(self, server_id: str) -> None:
        await self.servers.pop(server_id).stop(0)

    def add_agent(self, agent_id: str, port: int, **overrides: Any) -> RunningAgent:
        fields = {"count_server_leases": True, "kubeconfig": self.kubeconfig, "lease_list_interval": 0.2, **overrides}
        running = RunningAgent(agent_config(self.pki, port, agent_id=agent_id, **fields))
        self.agents.append(running)
        return running

    async def aclose(self) -> None:
        for running in self.agents:
            await running.stop()
        for server in self.servers.values():
            await server.stop(0)
        if self.balancer is not None:
            await self.balancer.aclose()


@pytest.fixture
async def fleet(pki: DemoPki, short_tmp: Path, kubeconfig: str) -> AsyncIterator[Fleet]:
    running = Fleet(pki, short_tmp, kubeconfig)
    try:
        yield running
    finally:
        await running.aclose()


def planted(name: str, renewed_seconds_ago: float, labels: dict[str, str] | None = None) -> dict[str, Any]:
    renewed = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=renewed_seconds_ago)
    return {"metadata": {"name": name, "labels": labels or LABELS},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 30,
                     "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}


# ------------------------------------------------------------------------ server
async def test_server_publishes_renews_and_deletes_its_lease(fleet: Fleet, fake: FakeKube) -> None:
    await fleet.start_server("server-a")
    name = "konnectivity-proxy-server-server-a"
    await wait_for(lambda: fake.lease(NS, name) is not None, what="the server's Lease")
    lease = fake.lease(NS, name)
    assert lease is not None
    assert lease["metadata"]["labels"] == LABELS
    assert lease["spec"]["holderIdentity"] == "server-a"
    assert lease["spec"]["leaseDurationSeconds"] == 2
    first = lease["spec"]["renewTime"]
    await wait_for(lambda: (fake.lease(NS, name) or {}).get("spec", {}).get("renewTime") != first,
                   what="a renewal")
    renewed = fake.lease(NS, name)
    assert renewed is not None and int(renewed["metadata"]["resourceVersion"]) > int(lease["metadata"]["resourceVersion"])
    assert renewed["metadata"]["uid"] == lease["metadata"]["uid"]  # renewed in place, not re-created
    await fleet.stop_server("server-a")
    assert fake.lease(NS, name) is None


async def test_gc_culls_expired_leases_only_and_counts_them(fleet: Fleet, fake: FakeKube) -> None:
    fake.store_lease(NS, planted("konnectivity-proxy-server-gone", 300))
    fake.store_lease(NS, planted("konnectivity-proxy-server-alive", 1))
    fake.store_lease(NS, planted("someone-elses", 300, labels={"app": "other"}))
    server = await fleet.start_server("server-a")
    await wait_for(lambda: server.metrics.culled_leases.value() == 1, what="the expired Lease culled")
    assert fake.lease(NS, "konnectivity-proxy-server-gone") is None
    assert fake.lease(NS, "konnectivity-proxy-server-alive") is not None
    assert fake.lease(NS, "someone-elses") is not None  # other labels: not ours to delete
    assert fake.lease(NS, "konnectivity-proxy-server-server-a") is not None
    assert server_metric(server, "lease_delete_total", http_status_code="200", reason="") == 1
    assert server_metric(server, "lease_delete_latency_seconds_count", http_status_code="200") == 1
    assert server_metric(server, "lease_list_total", http_status_code="200", reason="") >= 1
    text = server.metrics.render().decode()
    assert "konnectivity_network_proxy_server_culled_leases_count 1.0" in text


async def test_gc_keeps_a_lease_renewed_between_list_and_delete(fleet: Fleet, fake: FakeKube) -> None:
    """The delete carries the listed resourceVersion: a renewal in between makes it a 409."""
    server = await fleet.start_server("server-a", lease_gc_interval=3600)  # GC driven by hand below
    controller = server.lease_controller
    assert controller is not None
    stale = fake.store_lease(NS, planted("konnectivity-proxy-server-racing", 300))
    original = controller.api.list_namespaced_lease

    def list_then_renew(*args: Any, **kwargs: Any) -> Any:
        listed = original(*args, **kwargs)
        fake.store_lease(NS, planted("konnectivity-proxy-server-racing", 0))  # renewed meanwhile
        return listed

    controller.api.list_namespaced_lease = list_then_renew  # type: ignore[method-assign]
    assert await controller.collect_garbage() == 0
    kept = fake.lease(NS, "konnectivity-proxy-server-racing")
    assert kept is not None and kept["metadata"]["resourceVersion"] != stale["metadata"]["resourceVersion"]
    # >= 1: the controller's own first pass at start-up may race this one to the same Lease
    assert server_metric(server, "lease_delete_total", http_status_code="409", reason="Conflict") >= 1
    assert server.metrics.culled_leases.value() == 0


async def test_a_refused_lease_api_is_retried_and_counted_with_its_status(
    fleet: Fleet, fake: FakeKube, tmp_path: Path
) -> None:
    """Without credentials the API answers 401: the server keeps serving, logs, counts the list."""
    anonymous = tmp_path / "anonymous"
    fake.write_kubeconfig(anonymous, token="nobody-knows-me")
    server = await fleet.start_server("server-a", kubeconfig=str(anonymous))
    await wait_for(lambda: server_metric(server, "lease_list_total", http_status_code="401", reason="Unauthorized") >= 2,
                   what="refused lists counted")
    assert fake.lease(NS, "konnectivity-proxy-server-server-a") is None


async def test_bad_lease_labels_and_kubeconfig_are_clear_errors(pki: DemoPki, short_tmp: Path) -> None:
    with pytest.raises(ConfigError, match="--lease-label"):
        server_config(pki, short_tmp, enable_lease_controller=True, lease_label="k8s-app").validate()
    server = ProxyServer(server_config(pki, short_tmp, enable_lease_controller=True,
                                       kubeconfig=str(short_tmp / "missing")))
    try:
        with pytest.raises(ConfigError, match="cannot load --kubeconfig"):
            await server.start()
    finally:
        await server.stop(0)


# ------------------------------------------------------------------------- agent
async def test_agents_follow_servers_appearing_and_disappearing(fleet: Fleet, fake: FakeKube) -> None:
    # Every server claims servercount=1: only the Leases can tell the agents there are more.
    a = await fleet.start_server("s1", server_count=1)
    b = await fleet.start_server("s2", server_count=1)
    fleet.balancer = lb = await Balancer([a.agent_port, b.agent_port]).start()
    agents = [fleet.add_agent(f"agent-{i}", lb.port) for i in (1, 2)]

    def held() -> list[set[str]]:
        return [set(running.agent.clients.sessions) for running in agents]

    await wait_for(lambda: held() == [{"s1", "s2"}] * 2, what="both servers found through their Leases", timeout=30)
    assert all(agent_metric(r, "known_server_count") == 2 for r in agents)
    assert all(agent_metric(r, "lease_lists_total", http_response_code="200", reason="") >= 1 for r in agents)

    # A third server appears: its Lease brings every agent to it.
    c = await fleet.start_server("s3", server_count=1)
    lb.backends.append(c.agent_port)
    await wait_for(lambda: held() == [{"s1", "s2", "s3"}] * 2, what="the new server joined", timeout=30)
    await wait_for(lambda: all(agent_metric(r, "known_server_count") == 3 for r in agents), what="count 3", timeout=30)

    # s2 goes away: its Lease is deleted on shutdown, so the target drops at once, not after 30 s.
    await fleet.stop_server("s2")
    lb.backends.remove(b.agent_port)
    await wait_for(lambda: held() == [{"s1", "s3"}] * 2, what="s2 streams gone", timeout=30)
    await wait_for(lambda: all(agent_metric(r, "known_server_count") == 2 for r in agents), what="count 2", timeout=30)
    assert fake.lease(NS, "konnectivity-proxy-server-s2") is None


async def test_an_expired_lease_stops_counting_without_a_new_list(fleet: Fleet, fake: FakeKube) -> None:
    """Validity is judged when the count is asked for: a Lease that lapses between two lists
    no longer counts, and none valid means a target of 1."""
    fake.store_lease(NS, planted("konnectivity-proxy-server-x", 30 - 4.0))  # lapses in about 4 s
    fake.store_lease(NS, planted("konnectivity-proxy-server-y", 30 - 4.0))
    running = fleet.add_agent("agent-1", 1, lease_list_interval=3600)  # one list only
    await wait_for(lambda: running.agent.lease_counter is not None and running.agent.lease_counter.lists == 1,
                   what="the first list")
    counter = running.agent.lease_counter
    assert counter is not None
    assert running.agent.clients.target_count == 2
    await wait_for(lambda: counter.count() == 0, what="both Leases lapse", timeout=10)
    assert running.agent.clients.target_count == 1
    assert counter.lists == 1


async def test_server_count_source_max_takes_the_larger(fleet: Fleet, fake: FakeKube) -> None:
    server = await fleet.start_server("s1", server_count=3)  # one Lease, header says 3
    running = fleet.add_agent("agent-1", server.agent_port, server_count_source="max")
    await wait_for(lambda: "s1" in running.agent.clients.sessions, what="connected")
    await wait_for(lambda: agent_metric(running, "known_server_count") == 3, what="max(1 lease, header 3)")
    counter = running.agent.lease_counter
    assert counter is not None
    await wait_for(lambda: counter.count() == 1, what="the server's Lease listed")
    view = debug.agent(running.agent.clients)  # the admin port's /debug/agent explains the target
    assert (view["server_count"], view["server_count_from_headers"], view["server_count_from_leases"],
            view["server_count_source"]) == (3, 3, 1, "max")
    other = fleet.add_agent("agent-2", server.agent_port)  # default source: the Leases win
    await wait_for(lambda: "s1" in other.agent.clients.sessions, what="connected")
    await wait_for(lambda: agent_metric(other, "known_server_count") == 1, what="leases: 1")


async def test_an_agent_connects_even_when_the_lease_api_refuses_it(
    fleet: Fleet, fake: FakeKube, tmp_path: Path, pki: DemoPki, short_tmp: Path
) -> None:
    """Lease counting is advisory: with the API refusing (401) the agent still serves its server
    (target 1), logs why, and counts the refused lists under the reference's metric."""
    anonymous = fake.write_kubeconfig(tmp_path / "anonymous", token="nobody-knows-me")
    directory = short_tmp / "plain"
    directory.mkdir()
    server = ProxyServer(server_config(pki, directory, server_id="plain", server_count=1))
    fleet.servers["plain"] = server
    await server.start()
    running = fleet.add_agent("agent-1", server.agent_port, kubeconfig=str(anonymous))
    await wait_for(lambda: "plain" in running.agent.clients.sessions, what="connected despite the API")
    await wait_for(lambda: agent_metric(running, "lease_lists_total", http_response_code="401",
                                        reason="Unauthorized") >= 2, what="refused lists counted")
    assert running.agent.clients.target_count == 1


def test_an_agent_without_api_access_is_a_clear_startup_error(pki: DemoPki, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy_agent.app import ProxyAgent

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="in-cluster configuration"):
        ProxyAgent(agent_config(pki, 1, count_server_leases=True, kubeconfig=""))


async def test_the_server_binary_publishes_with_the_reference_flags_and_deletes_on_sigterm(
    pki: DemoPki, fake: FakeKube, kubeconfig: str, short_tmp: Path
) -> None:
    from tests.processes import child

    args = [
        f"--uds-name={short_tmp / 'konnectivity-server.socket'}", "--server-port=0",
        f"--cluster-cert={pki.server_cert}", f"--cluster-key={pki.server_key}",
        "--agent-port=0", "--admin-port=0", "--health-port=0", "--agent-bind-address=127.0.0.1",
        "--health-bind-address=127.0.0.1", "--server-id=cp-1", f"--kubeconfig={kubeconfig}",
        "--enable-lease-controller", "--lease-namespace=konnectivity", "--lease-label=k8s-app=konnectivity-server,tier=cp",
    ]
    name = "konnectivity-proxy-server-cp-1"
    async with child("proxy_server", *args, name="server") as server:
        await wait_for(lambda: fake.lease("konnectivity", name) is not None, what="the Lease", timeout=20)
        lease = fake.lease("konnectivity", name)
        assert lease is not None
        assert lease["metadata"]["labels"] == {"k8s-app": "konnectivity-server", "tier": "cp"}
        assert lease["spec"]["holderIdentity"] == "cp-1" and lease["spec"]["leaseDurationSeconds"] == 30
        server.terminate()
        assert await server.wait_exit(timeout=10) == 0
    assert fake.lease("konnectivity", name) is None
    assert "server lease deleted" in server.log
