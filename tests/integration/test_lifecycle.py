"""Graceful lifecycle of the real binaries, run as child processes with the args of our
manifests (configs/), signalled by PID.

* agent, first SIGTERM: DRAIN to the server, new dials refused, open connections finish,
  exit 0; second SIGTERM: exit at once.
* server, SIGTERM: stop accepting, close, remove the socket, exit 0.
* the documentation's whole setup: `proxy-server certs`, the static Pod's args, the
  DaemonSet's args, token authentication through the kubeconfig, probes, a request.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import grpc
import pytest

from proxy_agent.connections import DRAINING_ERROR, ConnectionTable, DialRefused, Send, StartDial
from proxy_common.certs import DemoPki
from proxy_common.client import TunnelDialError, open_tunnel, uds_channel
from proxy_common.messages import Data, DialRequest, DialResponse
from proxy_common.streams import PROXY_METHOD
from proxy_server import certs_command
from proxy_server.backends import Backend
from tests import http_probe
from tests import manifests as m
from tests.fakekube import FakeKube
from tests.harness import Stack, echo, echo_handler, endpoint, http_handler, wait_for
from tests.processes import child

pytestmark = pytest.mark.integration
AUDIENCE = "system:konnectivity-server"


def agent_args(pki: DemoPki, port: int, token: Path, *extra: str) -> list[str]:
    """The DaemonSet's args, pointed at a loopback server; listeners on loopback, port 0."""
    _doc, container = m.only_container(m.AGENT_DAEMONSET)
    args = m.rewrite(container["args"], {
        "--ca-cert": str(pki.ca_cert), "--proxy-server-host": "127.0.0.1", "--proxy-server-port": str(port),
        "--admin-server-port": "0", "--health-server-port": "0", "--service-account-token-path": str(token),
    })
    return [*args, "--health-server-host=127.0.0.1", "--sync-interval=100ms", "--probe-interval=200ms", *extra]


def server_args(pki: DemoPki, socket: Path, kubeconfig: Path) -> list[str]:
    """The static Pod's args with this machine's paths; listeners on loopback, port 0."""
    _doc, container = m.only_container(m.SERVER_POD)
    args = m.rewrite(container["args"], {
        "--uds-name": str(socket), "--cluster-cert": str(pki.server_cert), "--cluster-key": str(pki.server_key),
        "--agent-port": "0", "--admin-port": "0", "--health-port": "0", "--kubeconfig": str(kubeconfig),
    })
    return [*args, "--agent-bind-address=127.0.0.1", "--health-bind-address=127.0.0.1"]


def backend(stack: Stack, agent_id: str) -> Backend | None:
    return next((b for b in stack.server.registry.backends() if b.agent_id == agent_id), None)


def test_a_draining_table_refuses_dials_and_keeps_its_connections() -> None:
    table = ConnectionTable()
    (start,) = table.receive(DialRequest(dial_id=7, address="10.0.0.1:443"))
    assert isinstance(start, StartDial)
    table.dial_succeeded(start.conn_id)
    table.drain()
    assert table.receive(DialRequest(dial_id=8, address="10.0.0.1:443")) == [
        Send(DialResponse(8, error=DRAINING_ERROR)), DialRefused(8, "10.0.0.1:443")]
    assert len(table) == 1
    assert table.receive(Data(start.conn_id, b"still flowing"))[0].conn_id == start.conn_id


async def test_first_sigterm_drains_the_agent_until_its_connections_finish(
    stack: Stack, pki: DemoPki, short_tmp: Path
) -> None:
    token = short_tmp / "token"
    token.write_text("unused-without-token-auth")
    async with endpoint(echo_handler) as ep, child(
        "proxy_agent", *agent_args(pki, stack.server.agent_port, token, "--agent-id=drainee"), name="agent"
    ) as agent:
        health = await agent.port("health listener started")
        await wait_for(lambda: backend(stack, "drainee") is not None, timeout=20, what="agent registered")
        await http_probe.wait_status(health, "/readyz", 200)
        busy = await open_tunnel(ep.address, uds_path=stack.uds)
        await echo(busy, b"before the signal")

        agent.terminate()
        await wait_for(lambda: backend(stack, "drainee").draining, what="DRAIN seen by the server")
        with pytest.raises(TunnelDialError, match=f"^{DRAINING_ERROR}$"):
            await open_tunnel(ep.address, uds_path=stack.uds)  # the only agent: asked anyway, refuses

        await stack.add_agent(agent_id="other")
        others = [await open_tunnel(ep.address, uds_path=stack.uds) for _ in range(8)]
        for tunnel in others:
            await echo(tunnel, b"new dial")
        view = json.loads((await http_probe.get(stack.server.admin_port_bound, "/debug/connections")).body)
        carriers = Counter(row["agent_id"] for row in view if row["state"] == "established")
        assert carriers == {"drainee": 1, "other": 8}

        await echo(busy, b"the open transfer carries on " * 2000)
        for tunnel in others:
            await tunnel.aclose()
        assert agent.proc.returncode is None, "exited with a connection still open"
        await busy.aclose()
        assert await agent.wait_exit(timeout=15) == 0
    assert "drain over, closing open_connections=0" in agent.log
    await wait_for(lambda: backend(stack, "drainee") is None, what="drained agent gone")


async def test_second_sigterm_exits_at_once(stack: Stack, pki: DemoPki, short_tmp: Path) -> None:
    token = short_tmp / "token"
    token.write_text("unused-without-token-auth")
    async with endpoint(echo_handler) as ep, child(
        "proxy_agent", *agent_args(pki, stack.server.agent_port, token, "--agent-id=quitter"), name="agent"
    ) as agent:
        await wait_for(lambda: backend(stack, "quitter") is not None, timeout=20, what="agent registered")
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        await echo(tunnel, b"open")
        agent.terminate()
        await wait_for(lambda: backend(stack, "quitter").draining, what="DRAIN seen by the server")
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        agent.terminate()
        assert await agent.wait_exit(timeout=5) == 0
        assert loop.time() - signalled < 5.0, "the default drain grace (25s) was not cut short"
        async with asyncio.timeout(10):
            assert await tunnel.receive() == b""  # the server closed the tunnel the agent dropped
        await tunnel.aclose()
    assert "second signal: exiting now" in agent.log
    await wait_for(lambda: backend(stack, "quitter") is None, what="agent gone")


async def test_server_sigterm_closes_open_streams_removes_its_socket_and_exits_0(
    pki: DemoPki, short_tmp: Path, tmp_path: Path
) -> None:
    assert certs_command.main(["--out", str(tmp_path / "etc"), "--apiserver-url", "https://127.0.0.1:1"]) == 0
    socket = short_tmp / "konnectivity-server.socket"
    async with child("proxy_server", *server_args(pki, socket, tmp_path / "etc" / "konnectivity-server.conf"),
                     name="server") as server:
        health = await server.port("health listener started")
        admin = await server.port("admin listener started")
        assert (await http_probe.get(health, "/healthz")).body == b"ok"
        channel = uds_channel(str(socket))
        try:
            call = channel.stream_stream(PROXY_METHOD)()  # a client stream left open, no dial yet
            await call.wait_for_connection()
            gauge = 'konnectivity_network_proxy_server_grpc_connections{service_method="Proxy"} 1.0'
            await http_probe.wait_text(admin, "/metrics", gauge)
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            server.terminate()
            assert await server.wait_exit(timeout=10) == 0
            stop_seconds = loop.time() - signalled
            assert (await call.code()) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        finally:
            await channel.close()
        assert stop_seconds < 8.0
    assert not socket.exists(), "the server removed its socket"
    with pytest.raises(OSError):
        await http_probe.get(health, "/healthz")


async def test_the_documentation_setup_runs_and_stops_cleanly(pki: DemoPki, short_tmp: Path, tmp_path: Path) -> None:
    token = "projected-token-for-konnectivity-agent"
    (short_tmp / "token").write_text(token)
    socket = short_tmp / "konnectivity-server.socket"
    with FakeKube(pki) as kube:
        kube.add_service_account_token(token, "kube-system", "konnectivity-agent", audiences=(AUDIENCE,))
        # 1. the certificate and kubeconfig, from the cluster CA, as the documentation makes them
        assert certs_command.main(["--out", str(tmp_path / "etc"), "--ca-cert", str(pki.ca_cert),
                                   "--ca-key", str(pki.ca_cert.with_name("ca.key")), "--apiserver-url", kube.url]) == 0
        kubeconfig = tmp_path / "etc" / "konnectivity-server.conf"
        # 2. the static Pod's args
        async with child("proxy_server", *server_args(pki, socket, kubeconfig), name="server") as server:
            health = await server.port("health listener started")
            admin = await server.port("admin listener started")
            agent_port = await server.port("agent port listening")
            assert (await http_probe.get(health, "/healthz")).body == b"ok"
            assert (await http_probe.get(health, "/readyz")).status == 500
            # 3. the DaemonSet's args, with a token the server checks through the kubeconfig
            async with child("proxy_agent", *agent_args(pki, agent_port, short_tmp / "token"), name="agent") as agent:
                await http_probe.wait_status(health, "/readyz", 200)
                await http_probe.wait_status(await agent.port("health listener started"), "/readyz", 200)
                assert kube.reviewed_tokens()[:1] == [token]
                assert kube.token_reviews[0].audiences == (AUDIENCE,)
                async with endpoint(http_handler) as ep:
                    tunnel = await open_tunnel(ep.address, uds_path=str(socket))
                    reader, writer = await tunnel.open_streams()
                    writer.write(f"GET /through-konnectivity HTTP/1.1\r\nHost: {ep.address}\r\n\r\n".encode())
                    await writer.drain()
                    assert (await reader.read()).endswith(b"hello from /through-konnectivity</body></html>")
                    writer.close()
                metrics = (await http_probe.get(admin, "/metrics")).text
                assert 'konnectivity_network_proxy_server_grpc_connections{service_method="Connect"} 1.0' in metrics
                agent.terminate()
                assert await agent.wait_exit(timeout=15) == 0
            await http_probe.wait_status(health, "/readyz", 500)
            server.terminate()
            assert await server.wait_exit(timeout=10) == 0
        assert not socket.exists(), "the server removed its socket"
    assert "cannot" not in server.log.lower() and " E " not in server.log
