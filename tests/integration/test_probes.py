"""Health, readiness, metrics and debug listeners over real HTTP, answering as the Go
binaries do (tests/interop/server-behaviour.md, *-metrics.prom)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

import h11
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy_common import logs, probes
from proxy_common.certs import DemoPki
from proxy_common.client import TunnelDialError, open_tunnel
from proxy_common.probes import METRICS_CONTENT_TYPE
from proxy_server.app import ProxyServer
from tests import http_probe
from tests.harness import RunningAgent, Stack, agent_config, echo_handler, echo_once, endpoint, server_config, wait_for

pytestmark = pytest.mark.integration
INTEROP = Path(__file__).resolve().parents[1] / "interop"
NOT_READY_AGENT = b"[+]ping ok\n[-]server-connected failed: no servers connected\n"


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def reference_families(name: str, prefix: str) -> dict[str, object]:
    return {k: f for k, f in families((INTEROP / name).read_text()).items() if k.startswith(prefix)}


def label_names(registry: CollectorRegistry) -> dict[str, frozenset[str]]:
    """Each family's label names as declared (families with labels show no sample until used)."""
    found: dict[str, frozenset[str]] = {}
    for collector in list(registry._collector_to_names):
        describe = getattr(collector, "describe", None)
        for metric in (describe() if describe else None) or collector.collect():
            declared = getattr(collector, "_labelnames", None)
            if declared is None:
                declared = {name for sample in metric.samples for name in sample.labels}
            found[metric.name] = frozenset(declared) - {"le"}
    return found


def assert_reference_families(text: str, recording: str, prefix: str, registry: CollectorRegistry) -> None:
    """Every reference family: same name, type, help text and label names."""
    ours, declared = families(text), label_names(registry)
    reference = reference_families(recording, prefix)
    assert reference, f"{recording} has {prefix} families"
    for name, ref in reference.items():
        assert name in ours, f"{name} missing"
        assert (ours[name].type, ours[name].documentation) == (ref.type, ref.documentation), name
        for sample in ref.samples:
            assert frozenset(sample.labels) - {"le"} <= declared[name], name


async def endpoints_closed(running: RunningAgent) -> None:
    """The agent has finished with every endpoint connection (metrics and logs are written)."""
    await wait_for(lambda: running.agent.open_connections() == 0, what="agent endpoint connections closed")


# ------------------------------------------------------------------- server health
async def test_server_health_and_readiness_follow_the_agents(stack: Stack) -> None:
    port = stack.server.health_port_bound
    healthz = await http_probe.get(port, "/healthz")
    assert (healthz.status, healthz.body) == (200, b"ok")
    assert healthz.headers["content-type"] == "text/plain; charset=utf-8"
    assert healthz.headers["content-length"] == "2"
    for path in ("/readyz", "/ready"):
        reply = await http_probe.get(port, path)
        assert (reply.status, reply.body) == (500, b"no connection to any proxy agent")
        assert reply.headers["content-type"] == "text/plain; charset=utf-8"

    running = await stack.add_agent()
    for path in ("/readyz", "/ready", "/readyz?verbose"):
        reply = await http_probe.get(port, path)
        assert (reply.status, reply.body) == (200, b"ok")

    await running.stop()
    await wait_for(lambda: len(stack.server.registry) == 0, what="agent gone")
    reply = await http_probe.get(port, "/readyz")
    assert (reply.status, reply.body) == (500, b"no connection to any proxy agent")
    stack.agents.remove(running)


async def test_unknown_paths_get_gos_404(stack: Stack) -> None:
    for port, path in ((stack.server.health_port_bound, "/livez"), (stack.server.health_port_bound, "/"),
                       (stack.server.health_port_bound, "/healthz/"), (stack.server.admin_port_bound, "/healthz")):
        reply = await http_probe.get(port, path)
        assert (reply.status, reply.body) == (404, b"404 page not found\n")
        assert reply.headers["x-content-type-options"] == "nosniff"


async def test_server_metrics_carry_the_reference_families_after_a_tunneled_request(stack: Stack) -> None:
    await stack.add_agent()
    with pytest.raises(TunnelDialError):
        await open_tunnel("127.0.0.1:1", uds_path=stack.uds)  # a refused dial: error_response
    async with endpoint(echo_handler) as ep:
        await echo_once(stack.uds, ep.address, b"x" * 1000)
    await stack.wait_idle()

    for port in (stack.server.health_port_bound, stack.server.admin_port_bound):
        reply = await http_probe.get(port, "/metrics")
        assert reply.status == 200 and reply.headers["content-type"] == METRICS_CONTENT_TYPE
    assert_reference_families(reply.text, "server-metrics.prom", "konnectivity_network_proxy_server_",
                              stack.server.metrics.registry)
    ours = families(reply.text)
    assert 'le="86400"' in reply.text and 'le="1e-06"' in reply.text  # bucket bounds printed as Go does
    assert "_created" not in reply.text
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in ours.values() for s in f.samples}
    prefix = "konnectivity_network_proxy_server_"
    # The reference's exact names for its `_count` counters (the parser would add `_total`).
    assert f'\n{prefix}dial_failure_count{{reason="error_response"}} 1.0\n' in reply.text
    assert f"# TYPE {prefix}culled_leases_count counter\n{prefix}culled_leases_count 0.0\n" in reply.text
    assert "dial_failure_count_total" not in reply.text
    assert value[(prefix + "stream_packets_total", (("packet_type", "DIAL_REQ"), ("segment", "from_client")))] == 2
    assert value[(prefix + "data_bytes_total", (("direction", "client_to_agent"),))] == 1000
    assert value[(prefix + "data_bytes_total", (("direction", "agent_to_client"),))] == 1000
    assert value[(prefix + "closed_connections_total", (("reason", "agent_closed"),))] == 1
    assert value[(prefix + "connection_duration_seconds_count", ())] == 1
    assert {"process_cpu_seconds_total", "process_open_fds", "process_resident_memory_bytes"} <= {
        s.name for f in ours.values() for s in f.samples}
    scrapes = value[("promhttp_metric_handler_requests_total", (("code", "200"),))]
    assert scrapes == 1  # the health port's scrape, counted once it was served


# -------------------------------------------------------------------- agent health
async def test_agent_health_readiness_and_metrics(stack: Stack) -> None:
    running = await stack.add_agent()
    agent = running.agent
    port = agent.health_port_bound
    assert (await http_probe.get(port, "/healthz")).body == b"ok"
    ready = await http_probe.get(port, "/readyz")
    assert (ready.status, ready.body) == (200, b"ok")
    verbose = await http_probe.get(port, "/ready?verbose")
    assert (verbose.status, verbose.body) == (200, b"[+]ping ok\n[+]server-connected ok\ncheck passed\n")

    async with endpoint(echo_handler) as ep:
        await echo_once(stack.uds, ep.address, b"y" * 300)
    await stack.wait_idle()
    await endpoints_closed(running)
    reply = await http_probe.get(port, "/metrics")
    assert reply.headers["content-type"] == METRICS_CONTENT_TYPE
    assert_reference_families(reply.text, "agent-metrics.prom", "konnectivity_network_proxy_agent_",
                              agent.metrics.registry)
    ours = families(reply.text)
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in ours.values() for s in f.samples}
    prefix = "konnectivity_network_proxy_agent_"
    assert value[(prefix + "open_server_connections", ())] == 1
    assert value[(prefix + "data_bytes_total", (("direction", "server_to_endpoint"),))] == 300
    assert value[(prefix + "data_bytes_total", (("direction", "endpoint_to_server"),))] == 300
    assert value[(prefix + "closed_endpoint_connections_total", (("reason", "close_request"),))] == 1
    assert value[(prefix + "endpoint_connection_duration_seconds_count", ())] == 1
    assert 'le="10"' in reply.text and "_created" not in reply.text


async def test_agent_without_a_server_is_not_ready(pki: DemoPki) -> None:
    running = RunningAgent(agent_config(pki, 1, connect_timeout=0.5))  # nothing listens on port 1
    try:
        await wait_for(lambda: running.agent.health_port_bound != 0, what="agent listeners")
        for path in ("/readyz", "/ready", "/readyz?verbose"):
            reply = await http_probe.get(running.agent.health_port_bound, path)
            assert (reply.status, reply.body) == (503, NOT_READY_AGENT)
        assert (await http_probe.get(running.agent.health_port_bound, "/healthz")).body == b"ok"
    finally:
        await running.stop()


async def test_agent_admin_metrics_moves_to_the_health_port(stack: Stack) -> None:
    agent = (await stack.add_agent()).agent
    admin, health = agent.admin_port_bound, agent.health_port_bound
    reply = await http_probe.get(admin, "/metrics")
    assert reply.status == 301
    assert reply.headers["location"] == f"//127.0.0.1:{health}/metrics"
    assert reply.body == f'<a href="//127.0.0.1:{health}/metrics">Moved Permanently</a>.\n\n'.encode()
    v6 = await http_probe.get(admin, "/metrics?x=1", host=f"[::1]:{admin}")
    assert v6.headers["location"] == f"//[::1]:{health}/metrics?x=1"
    bare = await http_probe.get(admin, "/metrics", host="node-7", method="HEAD")
    assert (bare.status, bare.headers["location"], bare.body) == (301, f"//node-7:{health}/metrics", b"")


# ---------------------------------------------------------------------- debug view
async def test_debug_views_list_connections_and_agents(stack: Stack) -> None:
    await stack.add_agent(agent_identifiers="ipv4=10.0.0.5&host=node-a")
    async with endpoint(echo_handler) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        await tunnel.send(b"z" * 4000)
        received = b""
        while len(received) < 4000:
            received += await tunnel.receive()
        await wait_for(lambda: stack.agents[0].connection_count() == 1, what="agent connection")

        reply = await http_probe.get(stack.server.admin_port_bound, "/debug")
        assert reply.headers["content-type"] == "application/json"
        view = json.loads(reply.body)
        (conn,) = view["connections"]
        assert conn["state"] == "established" and conn["address"] == ep.address
        assert conn["agent_id"] == "test-agent" and conn["conn_id"] == tunnel.conn_id
        assert (conn["bytes_to_agent"], conn["bytes_to_client"]) == (4000, 4000)
        assert conn["age_seconds"] >= conn["established_seconds"] >= 0
        (agent,) = view["agents"]
        assert agent["identifiers"]["ipv4"] == ["10.0.0.5"] and agent["identifiers"]["host"] == ["node-a"]
        assert (agent["draining"], agent["connections"], agent["pending_dials"]) == (False, 1, 0)
        only = json.loads((await http_probe.get(stack.server.admin_port_bound, "/debug/agents")).body)
        assert [a["agent_id"] for a in only] == ["test-agent"]

        agent_admin = stack.agents[0].agent.admin_port_bound
        mine = json.loads((await http_probe.get(agent_admin, "/debug")).body)
        (row,) = mine["connections"]
        assert (row["address"], row["state"], row["bytes_to_endpoint"], row["bytes_from_endpoint"]) == (
            ep.address, "open", 4000, 4000)
        assert mine["agent"]["agent_id"] == "test-agent" and mine["agent"]["draining"] is False
        assert [s["server_id"] for s in mine["servers"]] == ["test-server"]
        await tunnel.aclose()
    await stack.wait_idle()
    after = json.loads((await http_probe.get(stack.server.admin_port_bound, "/debug/connections")).body)
    assert after == []


# -------------------------------------------------------------- the HTTP server
async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_keep_alive_head_and_bad_requests(stack: Stack) -> None:
    port = stack.server.health_port_bound
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        conn = h11.Connection(h11.CLIENT)
        for method, path in (("GET", "/healthz"), ("HEAD", "/readyz"), ("GET", "/readyz")):
            writer.write(conn.send(h11.Request(method=method, target=path, headers=[("Host", "x")])))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            reply = await http_probe.read_reply(conn, reader)
            assert reply.status == (200 if path == "/healthz" else 500)
            assert reply.body == (b"" if method == "HEAD" else reply.body)
            assert reply.headers["content-length"] == ("2" if path == "/healthz" else "32")
            conn.start_next_cycle()
    finally:
        writer.close()
        await writer.wait_closed()
    garbage = await raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 Bad Request\r\n") and garbage.endswith(b"400 Bad Request")
    huge = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (80 << 10) + b"\r\n\r\n")
    assert huge.startswith(b"HTTP/1.1 431 ")


async def test_header_deadline_and_connection_bound_hold() -> None:
    server = probes.ProbeServer("test", probes.routes({"/": lambda _r: probes.ok()}), host="127.0.0.1", port=0,
                                header_timeout=0.3, max_connections=2)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server after the deadline
        writer.close()
        await writer.wait_closed()
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await wait_for(lambda: len(server._tasks) == 2, what="two connections served")
        third_reader, third_writer = await asyncio.open_connection("127.0.0.1", server.port)
        async with asyncio.timeout(5):
            assert await third_reader.read() == b""  # over the bound: closed at once
        for _r, w in [*idle, (third_reader, third_writer)]:
            w.close()
            await w.wait_closed()
    finally:
        await server.aclose()


async def test_a_failing_page_is_a_500_not_a_dead_listener() -> None:
    def broken(_request: probes.Request) -> probes.Response:
        raise RuntimeError("bug")

    server = probes.ProbeServer("test", probes.routes({"/b": broken, "/ok": lambda _r: probes.ok()}),
                                host="127.0.0.1", port=0)
    await server.start()
    try:
        assert (await http_probe.get(server.port, "/b")).status == 500
        assert (await http_probe.get(server.port, "/ok")).body == b"ok"
    finally:
        await server.aclose()


async def test_listeners_bind_the_configured_address(pki: DemoPki, short_tmp: Path) -> None:
    server = ProxyServer(server_config(pki, short_tmp, health_bind_address="::1", admin_bind_address="127.0.0.1"))
    await server.start()
    try:
        assert (await http_probe.get(server.health_port_bound, "/healthz", address="::1", host="[::1]")).body == b"ok"
        if server.health_port_bound != server.admin_port_bound:  # the two families may share a number
            with pytest.raises(OSError):
                await http_probe.get(server.health_port_bound, "/healthz", address="127.0.0.1")
            with pytest.raises(OSError):
                await http_probe.get(server.admin_port_bound, "/metrics", address="::1")
    finally:
        await server.stop(0)


# --------------------------------------------------------------------------- logs
async def test_no_token_or_payload_byte_reaches_a_log(
    stack: Stack, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = "eyJTOKEN.do-not-log.me"
    payload = b"PAYLOAD-do-not-log-" * 50
    (short_tmp / "token").write_text(token)
    caplog.set_level(logging.DEBUG)
    running = await stack.add_agent(service_account_token_path=str(short_tmp / "token"))
    async with endpoint(echo_handler) as ep:
        await echo_once(stack.uds, ep.address, payload)
    await stack.wait_idle()
    await endpoints_closed(running)
    assert "endpoint closed conn_id=1 reason=close_request" in caplog.text  # per-connection lines were logged
    formatter = logs.OneLineFormatter()
    text = "\n".join(formatter.format(record) for record in caplog.records)
    assert token not in text and "do-not-log" not in text
    assert all("\n" not in formatter.format(record) for record in caplog.records)


def test_one_event_is_one_line() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed\nsecond line error=%s", ("a\r\nb",), None)
    assert logs.OneLineFormatter().format(record).endswith("x: failed\\nsecond line error=a\\r\\nb")


def test_klog_destination_flags_are_honoured(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    log_file = tmp_path / "agent.log"
    try:
        args = argparse.Namespace(verbosity=2, logtostderr="false", log_file=str(log_file), alsologtostderr=None)
        logs.configure_from_flags(args)
        (file_handler, console) = root.handlers
        assert isinstance(file_handler, logging.FileHandler) and console.level == logging.ERROR
        logging.getLogger("proxy_agent").info("connected to proxy server server_id=%s", "s-1")
        logging.getLogger("proxy_agent").debug("not at -v 2")
        logs.configure_from_flags(argparse.Namespace(verbosity=2, logtostderr=None, log_file=str(log_file),
                                                     alsologtostderr=None))
        (only,) = root.handlers  # --logtostderr defaults to true: stderr only, as klog
        assert isinstance(only, logging.StreamHandler) and not isinstance(only, logging.FileHandler)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved
    (line,) = log_file.read_text().splitlines()
    assert line.endswith(" I proxy_agent: connected to proxy server server_id=s-1")
