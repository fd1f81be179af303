"""Agent client certificates (`--cluster-ca-cert`) and the agent port's TLS settings.

Real TLS throughout: certificates made at test time, grpc.aio channels and in-process
agents for the Connect stream, and Python's `ssl` module as a hand-crafted client for the
protocol-version and cipher checks. `--cipher-suites` is applied by the CLI before grpc is
imported, so that check runs the real `proxy-server` command in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from proxy_common import certs
from proxy_common.certs import DemoPki
from proxy_common.client import open_tunnel
from proxy_common.streams import CONNECT_METHOD
from tests.harness import ROOT, Stack, assert_no_agent_gets_a_dial, echo_handler, endpoint, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent_certs(tmp_path_factory: pytest.TempPathFactory, pki: DemoPki) -> dict[str, tuple[Path, Path]]:
    """Client certificate pairs: from another CA, expired (right CA), not yet valid (right CA)."""
    directory = tmp_path_factory.mktemp("agent-certs")
    ca = certs.load_ca(pki.ca_cert, pki.ca_cert.with_suffix(".key"))
    other_ca = certs.make_ca("some-other-ca")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    return {
        "other_ca": certs.write_pair(directory, "other", certs.issue(other_ca, "konnectivity-agent", client=True)),
        "expired": certs.write_pair(directory, "expired",
                                    certs.issue(ca, "konnectivity-agent", client=True, not_before=past, days=1)),
        "not_yet_valid": certs.write_pair(directory, "future",
                                          certs.issue(ca, "konnectivity-agent", client=True, not_before=future)),
    }


@pytest.fixture
async def mtls_stack(pki: DemoPki, short_tmp: Path) -> AsyncIterator[Stack]:
    running = await Stack(pki, short_tmp, cluster_ca_cert=str(pki.ca_cert)).start()
    try:
        yield running
        await running.wait_idle()
    finally:
        await running.stop()


async def connect(stack: Stack, pair: tuple[Path, Path] | None) -> tuple[grpc.StatusCode, dict[str, str]]:
    """One Connect stream with the given client certificate (or none): its outcome."""
    key, cert = (pair[1].read_bytes(), pair[0].read_bytes()) if pair else (None, None)
    credentials = grpc.ssl_channel_credentials(stack.pki.ca_cert.read_bytes(), key, cert)
    async with grpc.aio.secure_channel(f"127.0.0.1:{stack.server.agent_port}", credentials) as channel:
        call = channel.stream_stream(CONNECT_METHOD)(metadata=[("agentid", "cert-agent")], wait_for_ready=False)
        try:
            async with asyncio.timeout(15):
                headers = dict(await call.initial_metadata())
                if "serverid" in headers:
                    call.cancel()
                    return grpc.StatusCode.OK, headers
                return await call.code(), headers
        except grpc.aio.AioRpcError as exc:
            return exc.code(), {}


# ------------------------------------------------------------------- client certs
async def test_the_right_certificate_is_accepted(mtls_stack: Stack) -> None:
    code, headers = await connect(mtls_stack, (mtls_stack.pki.agent_cert, mtls_stack.pki.agent_key))
    assert code is grpc.StatusCode.OK and headers["serverid"] == "test-server"


async def test_an_agent_with_the_right_certificate_carries_traffic(mtls_stack: Stack) -> None:
    await mtls_stack.add_agent(agent_cert=str(mtls_stack.pki.agent_cert), agent_key=str(mtls_stack.pki.agent_key))
    async with endpoint(echo_handler) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=mtls_stack.uds)
        await tunnel.send(b"over mutual TLS")
        assert await tunnel.receive() == b"over mutual TLS"
        await tunnel.aclose()


@pytest.mark.parametrize("which", ["none", "other_ca", "expired", "not_yet_valid"])
async def test_a_missing_or_invalid_certificate_is_refused_and_never_dialed(
    mtls_stack: Stack, agent_certs: dict[str, tuple[Path, Path]], which: str
) -> None:
    code, headers = await connect(mtls_stack, None if which == "none" else agent_certs[which])
    assert code is grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no stream at all
    assert "serverid" not in headers
    await assert_no_agent_gets_a_dial(mtls_stack)


async def test_an_agent_without_a_certificate_keeps_retrying_and_never_registers(
    mtls_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy_agent")
    await mtls_stack.add_agent(wait=False)

    def failures() -> int:
        return sum(r.getMessage().startswith("cannot connect to proxy server") for r in caplog.records)

    await wait_for(lambda: failures() >= 2, what="two failed attempts")
    await assert_no_agent_gets_a_dial(mtls_stack)


async def test_without_cluster_ca_no_client_certificate_is_needed(stack: Stack) -> None:
    code, _ = await connect(stack, None)
    assert code is grpc.StatusCode.OK


# ------------------------------------------------------------------- TLS settings
def handshake(port: int, ca: Path, *, version: ssl.TLSVersion, ciphers: str | None = None,
              client: tuple[Path, Path] | None = None) -> tuple[str, str]:
    """A raw TLS handshake to the agent port: (protocol, cipher) or the ssl error's text."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = version
    context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    if client:
        context.load_cert_chain(client[0], client[1])
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cipher = tls.cipher()
            return tls.version() or "", cipher[0] if cipher else ""
    except (ssl.SSLError, OSError) as exc:
        return "refused", str(exc)


def legacy_client_refused_by_server(port: int, ca: Path, version: ssl.TLSVersion) -> str:
    """Offer only an old protocol; the client side is configured to allow it."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):
        context.minimum_version = version
        context.maximum_version = version
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1"):
            return "accepted"
    except ssl.SSLError as exc:
        return str(exc)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
async def test_tls_below_1_2_is_refused_by_the_server(stack: Stack, version: ssl.TLSVersion) -> None:
    outcome = await asyncio.to_thread(legacy_client_refused_by_server, stack.server.agent_port, stack.pki.ca_cert, version)
    # The client sent its hello (a client unable to do so reports NO_PROTOCOLS_AVAILABLE);
    # the server hung up on it.
    assert "EOF" in outcome or "PROTOCOL_VERSION" in outcome.upper(), outcome


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_1_2_and_1_3_are_accepted(stack: Stack, version: ssl.TLSVersion) -> None:
    protocol, cipher = await asyncio.to_thread(handshake, stack.server.agent_port, stack.pki.ca_cert, version=version)
    assert protocol == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version], cipher


@pytest.mark.parametrize("weak", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"])
async def test_weak_tls_1_2_ciphers_are_not_offered_by_default(stack: Stack, weak: str) -> None:
    protocol, detail = await asyncio.to_thread(
        handshake, stack.server.agent_port, stack.pki.ca_cert, version=ssl.TLSVersion.TLSv1_2, ciphers=weak
    )
    assert protocol == "refused", detail
    protocol, cipher = await asyncio.to_thread(
        handshake, stack.server.agent_port, stack.pki.ca_cert, version=ssl.TLSVersion.TLSv1_2,
        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256",
    )
    assert (protocol, cipher) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")


async def test_client_certificate_checks_happen_in_the_handshake(
    mtls_stack: Stack, agent_certs: dict[str, tuple[Path, Path]]
) -> None:
    port, ca = mtls_stack.server.agent_port, mtls_stack.pki.ca_cert
    good = (mtls_stack.pki.agent_cert, mtls_stack.pki.agent_key)
    assert (await asyncio.to_thread(handshake, port, ca, version=ssl.TLSVersion.TLSv1_2, client=good))[0] == "TLSv1.2"
    for which in ("expired", "other_ca"):
        outcome = await asyncio.to_thread(handshake, port, ca, version=ssl.TLSVersion.TLSv1_2, client=agent_certs[which])
        assert outcome[0] == "refused", (which, outcome)
    outcome = await asyncio.to_thread(handshake, port, ca, version=ssl.TLSVersion.TLSv1_2)
    assert outcome[0] == "refused", outcome


# ------------------------------------------------------------------- --cipher-suites
@contextlib.contextmanager
def server_process(pki: DemoPki, tmp: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The real proxy-server command on ephemeral ports; yields it with its agent port."""
    args = [
        sys.executable, "-m", "proxy_server", f"--uds-name={tmp / 'p.sock'}", "--server-port=0",
        "--agent-bind-address=127.0.0.1", "--agent-port=0", f"--cluster-cert={pki.server_cert}",
        f"--cluster-key={pki.server_key}", "--health-bind-address=127.0.0.1", "--health-port=0",
        "--admin-port=0", "--v=2", *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "GRPC_SSL_CIPHER_SUITES"}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        port = 0
        for line in process.stderr:  # bounded: the process exits (EOF) if it cannot start
            if found := re.search(r"agent port listening address=127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))
                break
        assert port, f"server did not start (exit {process.poll()})"
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


async def test_cipher_suites_restrict_tls_1_2_and_leave_tls_1_3(pki: DemoPki, short_tmp: Path) -> None:
    def check() -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
        with server_process(pki, short_tmp, "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384") as (_, port):
            tls12 = ssl.TLSVersion.TLSv1_2
            return (
                handshake(port, pki.ca_cert, version=tls12, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"),
                handshake(port, pki.ca_cert, version=tls12, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384"),
                handshake(port, pki.ca_cert, version=ssl.TLSVersion.TLSv1_3),
            )

    not_listed, listed, tls13 = await asyncio.to_thread(check)
    assert not_listed[0] == "refused", not_listed
    assert listed == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")
    assert tls13[0] == "TLSv1.3"


async def test_an_in_process_server_applies_cipher_suites_and_the_tls13_minimum(pki: DemoPki, short_tmp: Path) -> None:
    """The agent port's TLS is Python's ssl: no process-wide setting, so a server started
    without the CLI honours --cipher-suites and --tls-min-version=VersionTLS13 too."""
    tls12 = ssl.TLSVersion.TLSv1_2
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    limited = await Stack(pki, short_tmp / "a", cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",)).start()
    try:
        port = limited.server.agent_port
        assert (await asyncio.to_thread(handshake, port, pki.ca_cert, version=tls12,
                                        ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))[0] == "refused"
        assert await asyncio.to_thread(handshake, port, pki.ca_cert, version=tls12,
                                       ciphers="ECDHE-ECDSA-AES256-GCM-SHA384") == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")
    finally:
        await limited.stop()
    modern = await Stack(pki, short_tmp / "b", tls_min_version="VersionTLS13").start()
    try:
        port = modern.server.agent_port
        assert (await asyncio.to_thread(handshake, port, pki.ca_cert, version=tls12))[0] == "refused"
        assert (await asyncio.to_thread(handshake, port, pki.ca_cert, version=ssl.TLSVersion.TLSv1_3))[0] == "TLSv1.3"
    finally:
        await modern.stop()
