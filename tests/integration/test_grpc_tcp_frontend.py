"""gRPC mode on TCP with mutual TLS (for clients that are not kube-apiserver).

Client library over a real TLS channel -> server's TCP frontend -> agent -> endpoint; a
client without a certificate, or with one from another CA, never gets a stream.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from proxy_common.certs import DemoPki, issue, make_ca, write_pair
from proxy_common.client import TunnelClient, TunnelDialError, open_tunnel, tls_channel
from proxy_common.errors import DialFailure
from tests.harness import Stack, echo_handler, endpoint, wait_for
from tests.http_connect_client import blackhole, tls_server_overrides

pytestmark = pytest.mark.integration


@pytest.fixture
async def tcp_stack(pki: DemoPki, short_tmp: Path) -> AsyncIterator[Stack]:
    running = await Stack(pki, short_tmp, mode="grpc", **tls_server_overrides(pki)).start()
    try:
        yield running
        await wait_for(lambda: not running.server.board.frontends, what="frontends released")
        await running.wait_idle()
    finally:
        await running.stop()


def target(stack: Stack) -> str:
    assert stack.server.frontend_port, "the TCP frontend has no port"
    return f"127.0.0.1:{stack.server.frontend_port}"


def good_channel(pki: DemoPki, stack: Stack) -> grpc.aio.Channel:
    return tls_channel(
        target(stack), pki.ca_cert.read_bytes(), pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    )


async def test_echo_over_mtls(tcp_stack: Stack, pki: DemoPki) -> None:
    await tcp_stack.add_agent()
    async with endpoint(echo_handler) as ep:
        tunnel = await open_tunnel(ep.address, channel=good_channel(pki, tcp_stack), timeout=10)
        await tunnel.send(b"over tcp and tls")
        assert await tunnel.receive() == b"over tcp and tls"
        await tunnel.aclose()


async def test_reusable_client_many_streams_over_mtls(tcp_stack: Stack, pki: DemoPki) -> None:
    await tcp_stack.add_agent()
    async with endpoint(echo_handler) as ep, TunnelClient(good_channel(pki, tcp_stack)) as client:
        tunnels = [await client.dial(ep.address, timeout=10) for _ in range(10)]
        for index, tunnel in enumerate(tunnels):
            await tunnel.send(f"stream {index}".encode())
        for index, tunnel in enumerate(tunnels):
            assert await tunnel.receive() == f"stream {index}".encode()
            await tunnel.aclose()


async def test_refused_dial_text_over_mtls(tcp_stack: Stack, pki: DemoPki) -> None:
    await tcp_stack.add_agent()
    with pytest.raises(TunnelDialError, match=r"^dial tcp 127\.0\.0\.1:1: connect: connection refused$"):
        await open_tunnel("127.0.0.1:1", channel=good_channel(pki, tcp_stack), timeout=10)


async def test_client_without_certificate_is_refused(tcp_stack: Stack, pki: DemoPki) -> None:
    await tcp_stack.add_agent()
    channel = grpc.aio.secure_channel(target(tcp_stack), grpc.ssl_channel_credentials(pki.ca_cert.read_bytes()))
    with pytest.raises(TunnelDialError, match="UNAVAILABLE"):
        await open_tunnel("127.0.0.1:1", channel=channel, timeout=10)
    assert tcp_stack.server.metrics.grpc_connections.labels("Proxy")._value.get() == 0
    assert not tcp_stack.server.board.frontends


async def test_client_certificate_from_another_ca_is_refused(tcp_stack: Stack, pki: DemoPki, short_tmp: Path) -> None:
    await tcp_stack.add_agent()
    cert, key = write_pair(short_tmp / "other", "client", issue(make_ca("someone-else"), "intruder", client=True))
    channel = tls_channel(target(tcp_stack), pki.ca_cert.read_bytes(), cert.read_bytes(), key.read_bytes())
    with pytest.raises(TunnelDialError, match="UNAVAILABLE"):
        await open_tunnel("127.0.0.1:1", channel=channel, timeout=10)
    assert tcp_stack.server.metrics.grpc_connections.labels("Proxy")._value.get() == 0
    assert not tcp_stack.server.board.frontends


async def test_server_certificate_from_another_ca_is_refused_by_the_client(
    tcp_stack: Stack, pki: DemoPki, short_tmp: Path
) -> None:
    """The other direction of mutual TLS: the client checks the server against its own CA."""
    other_ca, _ = write_pair(short_tmp / "other", "ca", make_ca("someone-else"))
    channel = tls_channel(
        target(tcp_stack), other_ca.read_bytes(), pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    )
    with pytest.raises(TunnelDialError, match="UNAVAILABLE"):
        await open_tunnel("127.0.0.1:1", channel=channel, timeout=10)


async def test_backend_dial_timeout_over_mtls(pki: DemoPki, short_tmp: Path) -> None:
    """--backend-dial-timeout in gRPC mode: the reference's DIAL_RSP error, and the agent
    drops the dial it was still making."""
    stack = await Stack(pki, short_tmp, mode="grpc", backend_dial_timeout=0.3, **tls_server_overrides(pki)).start()
    try:
        agent = await stack.add_agent(dial_timeout=30)
        async with blackhole() as port:
            with pytest.raises(TunnelDialError, match=r"^timed out waiting for backend dial$"):
                await open_tunnel(f"127.0.0.1:{port}", channel=good_channel(pki, stack), timeout=10)
            await wait_for(lambda: agent.connection_count() == 0, what="the agent dropped the abandoned dial")
        assert stack.server.metrics.dial_failures.value(str(DialFailure.BACKEND_DIAL_TIMEOUT)) == 1
        await wait_for(lambda: not stack.server.board.frontends, what="frontends released")
        await stack.wait_idle()
    finally:
        await stack.stop()


def _tls12_handshake(port: int, pki: DemoPki, ciphers: str) -> str:
    """A TLS 1.2 handshake with a client certificate offering only `ciphers`: the suite, or "refused"."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            return (tls.cipher() or ("",))[0]
    except (ssl.SSLError, OSError):
        return "refused"


@pytest.mark.parametrize("weak", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"])
async def test_weak_tls12_suites_are_not_offered_by_default(tcp_stack: Stack, pki: DemoPki, weak: str) -> None:
    """Without --cipher-suites only forward-secret AEAD suites, as grpc's and Go's defaults."""
    port = tcp_stack.server.frontend_port
    assert await asyncio.to_thread(_tls12_handshake, port, pki, weak) == "refused"
    good = "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert await asyncio.to_thread(_tls12_handshake, port, pki, good) == good
