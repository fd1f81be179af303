"""Client library -> Unix socket -> proxy-server -> TLS -> proxy-agent -> loopback endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import struct
import subprocess
import time

import pytest

from proxy_common.client import TunnelClient, TunnelDialError, connect_sync, open_tunnel
from proxy_common.errors import TunnelClosed
from proxy_server import frontend_service
from proxy_server.app import ProxyServer
from tests.harness import (
    Stack,
    assert_page,
    deterministic_chunks,
    echo_handler,
    endpoint,
    expected_sha256,
    http_handler,
    python_command,
    server_config,
    sized_sink,
    source_handler,
    wait_for,
)

pytestmark = pytest.mark.integration
BIG = 256 << 20


async def test_http_get_through_asyncio_streams(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(http_handler) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        reader, writer = await tunnel.open_streams()
        writer.write(f"GET /success HTTP/1.1\r\nHost: {ep.address}\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()
        assert_page(response)
        writer.close()
        await writer.wait_closed()
    await stack.wait_idle()


@pytest.mark.slow
async def test_256_mib_down_and_up_arrive_intact(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(source_handler(BIG)) as source, endpoint(sized_sink) as sink:
        started = time.perf_counter()
        down = hashlib.sha256()
        received = 0
        async with await open_tunnel(source.address, uds_path=stack.uds) as tunnel:
            while chunk := await tunnel.receive():
                down.update(chunk)
                received += len(chunk)
        down_seconds = time.perf_counter() - started
        assert received == BIG
        assert down.hexdigest() == expected_sha256(BIG)

        started = time.perf_counter()
        async with await open_tunnel(sink.address, uds_path=stack.uds) as tunnel:
            await tunnel.send(struct.pack("!Q", BIG))
            for piece in deterministic_chunks(BIG, b"up"):
                await tunnel.send(piece)
            answer = await tunnel.receive()
        up_seconds = time.perf_counter() - started
        assert answer.decode() == expected_sha256(BIG, b"up")
    print(f"\nthroughput down={BIG / down_seconds / 2**20:.0f} MiB/s up={BIG / up_seconds / 2**20:.0f} MiB/s")
    await stack.wait_idle()


async def test_200_concurrent_connections_each_echo(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(echo_handler) as ep, TunnelClient.over_uds(stack.uds) as client:

        async def one(index: int) -> None:
            payload = os.urandom(1000 + index)
            tunnel = await (client.dial(ep.address) if index % 2 else open_tunnel(ep.address, uds_path=stack.uds))
            async with tunnel:
                await tunnel.send(payload)
                got = b""
                while len(got) < len(payload):
                    got += await tunnel.receive()
                assert got == payload

        async with asyncio.timeout(30):
            await asyncio.gather(*(one(i) for i in range(200)))
        await wait_for(lambda: ep.open_connections == 0, what="endpoint connections to close")
    assert stack.server.metrics.established._value.get() == 0
    await stack.wait_idle()


def frontend_writers() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "_Frontend._write"]


async def test_idle_tunnels_hold_no_writer_task_and_get_one_for_new_data(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    # A control plane holds thousands of idle tunnels: the server writes to a client from a
    # task that is retired once the stream has been idle for a while.
    monkeypatch.setattr(frontend_service, "IDLE_WRITER_SECONDS", 0.1)
    await stack.add_agent()
    async with endpoint(echo_handler) as ep, TunnelClient.over_uds(stack.uds) as client:
        tunnels = [await client.dial(ep.address) for _ in range(20)]
        try:
            for round_ in range(2):
                for index, tunnel in enumerate(tunnels):
                    payload = f"round {round_} tunnel {index}".encode()
                    await tunnel.send(payload)
                    got = b""
                    while len(got) < len(payload):
                        got += await tunnel.receive()
                    assert got == payload
                await wait_for(lambda: not frontend_writers(), what="frontend writers to end while idle")
            # While a client does not read, its writer waits in grpc's flow control: it exists.
            bulk = os.urandom(8 << 20)
            await tunnels[0].send(bulk)
            await wait_for(lambda: len(frontend_writers()) == 1, what="a writer while the client does not read")
            got = b""
            while len(got) < len(bulk):
                got += await tunnels[0].receive()
            assert got == bulk
            await wait_for(lambda: not frontend_writers(), what="the writer to end once all is read")
        finally:
            await asyncio.gather(*(t.aclose() for t in tunnels))
    await stack.wait_idle()


async def test_a_busy_tunnel_keeps_one_writer_task(stack: Stack) -> None:
    # A dial's packets toward the client (DIAL_RSP, DATA, CLOSE_RSP) come a round trip apart:
    # one writer serves them all instead of a task per packet.
    await stack.add_agent()
    async with endpoint(echo_handler) as ep, TunnelClient.over_uds(stack.uds) as client:
        tunnel = await client.dial(ep.address)
        try:
            seen: set[asyncio.Task[object]] = set(frontend_writers())
            for index in range(10):
                await tunnel.send(b"ping %d" % index)
                assert await tunnel.receive() == b"ping %d" % index
                seen.update(frontend_writers())
            assert len(seen) == 1
        finally:
            await tunnel.aclose()
    await stack.wait_idle()


async def test_refused_dial_returns_the_reference_text(stack: Stack) -> None:
    await stack.add_agent()
    with pytest.raises(TunnelDialError) as refused:
        await open_tunnel("127.0.0.1:1", uds_path=stack.uds)
    assert str(refused.value) == "dial tcp 127.0.0.1:1: connect: connection refused"
    assert stack.server.metrics.dial_failures.value("error_response") == 1


async def test_no_agent_returns_the_reference_text(stack: Stack) -> None:
    with pytest.raises(TunnelDialError, match=r"^No agent available$"):
        await open_tunnel("127.0.0.1:80", uds_path=stack.uds)
    assert stack.server.metrics.dial_failures.value("no_agent") == 1


async def test_remote_close_ends_the_tunnel(stack: Stack) -> None:
    async def say_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye\n")
        await writer.drain()

    await stack.add_agent()
    async with endpoint(say_bye) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        assert await tunnel.receive() == b"bye\n"
        assert await tunnel.receive() == b""
        with pytest.raises(TunnelClosed):
            await tunnel.send(b"too late")
        await tunnel.aclose()
    await stack.wait_idle()


async def test_client_giving_up_on_a_dial_releases_it_everywhere(stack: Stack) -> None:
    """A dial to a blackhole is abandoned by the client; the agent's dial is cancelled."""
    running = await stack.add_agent(dial_timeout=30.0)
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, backlog=0)
    port = listener.sockets[0].getsockname()[1]
    # Fill the listen backlog so new connects hang (a local blackhole).
    fillers = []
    for _ in range(8):
        with contextlib.suppress(OSError):
            fillers.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.2))
    try:
        with pytest.raises(TunnelDialError, match="dial timeout, backstop"):
            await open_tunnel(f"127.0.0.1:{port}", uds_path=stack.uds, timeout=0.5)
        await stack.wait_idle()
        assert running.connection_count() == 0
        assert stack.server.metrics.dial_failures.value("frontend_close") == 1
    finally:
        for _, writer in fillers:
            writer.close()
        listener.close()
        await listener.wait_closed()


async def test_blocking_socket_for_sync_callers(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(echo_handler) as ep:
        sock = await asyncio.to_thread(connect_sync, ep.address, uds_path=stack.uds)
        with sock:
            await asyncio.to_thread(sock.sendall, b"ping")
            assert await asyncio.to_thread(sock.recv, 4) == b"ping"
        await wait_for(lambda: ep.open_connections == 0, what="endpoint close")
    await stack.wait_idle()


# --------------------------------------------------------------- real processes
def agent_process(stack: Stack, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        python_command(
            "proxy_agent",
            "--proxy-server-host=127.0.0.1",
            f"--proxy-server-port={stack.server.agent_port}",
            f"--ca-cert={stack.pki.ca_cert}",
            "--agent-id=subprocess-agent",
            "--sync-interval=100ms",
            "--sync-interval-cap=500ms",
            "--probe-interval=200ms",
            "--health-server-port=0",
            "--admin-server-port=0",
            *extra,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


async def test_agent_killed_mid_transfer_ends_the_tunnel_quickly(stack: Stack) -> None:
    agent = agent_process(stack)
    try:
        await wait_for(lambda: stack.server.registry.is_ready(), what="subprocess agent", timeout=20)
        async with endpoint(source_handler(1 << 40)) as source:
            tunnel = await open_tunnel(source.address, uds_path=stack.uds)
            assert await tunnel.receive()
            os.kill(agent.pid, signal.SIGKILL)
            killed = time.monotonic()
            async with asyncio.timeout(10):
                while await tunnel.receive():
                    pass
            ended_after = time.monotonic() - killed
            await tunnel.aclose()
            # The Go server leaves the client waiting 30 s; we end it when the stream breaks.
            # The bound is loose because a loaded 2-core CI machine may be slow to notice.
            assert ended_after < 3.0, f"tunnel ended {ended_after:.2f}s after the agent died"
            await stack.wait_idle()
            assert not stack.server.registry.is_ready()
    finally:
        stop_process(agent)


async def test_server_restart_agent_reconnects_and_new_dials_work(stack: Stack) -> None:
    agent = agent_process(stack)
    try:
        await wait_for(lambda: stack.server.registry.is_ready(), what="subprocess agent", timeout=20)
        config = stack.server.config
        port = stack.server.agent_port
        await stack.server.stop(0)
        stack.server = ProxyServer(server_config(stack.pki, stack.tmp, agent_port=port, uds_name=config.uds_name))
        await stack.server.start()
        await wait_for(lambda: stack.server.registry.is_ready(), what="agent to reconnect", timeout=20)
        async with endpoint(echo_handler) as ep, await open_tunnel(ep.address, uds_path=stack.uds) as tunnel:
            await tunnel.send(b"after restart")
            assert await tunnel.receive() == b"after restart"
        await stack.wait_idle()
    finally:
        stop_process(agent)


async def resetting_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send some bytes, then reset the connection (RST, not FIN) while the client still sends."""
    import socket

    writer.write(b"x" * 4096)
    await writer.drain()
    await reader.read(1)  # the client's first bytes
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize("flow_control", [False, True], ids=["plain", "flow"])
async def test_an_endpoint_reset_ends_only_its_own_connection(stack: Stack, flow_control: bool) -> None:
    running = await stack.add_agent(flow_control=flow_control)
    async with endpoint(echo_handler) as echo_ep, endpoint(resetting_handler) as reset_ep:
        bystander = await open_tunnel(echo_ep.address, uds_path=stack.uds)
        await bystander.send(b"before")
        assert await bystander.receive() == b"before"
        victim = await open_tunnel(reset_ep.address, uds_path=stack.uds)
        assert await victim.receive()
        for _ in range(50):  # keep writing into the reset socket
            try:
                await victim.send(b"y" * 65536)
            except TunnelClosed:
                break
            await asyncio.sleep(0.01)
        async with asyncio.timeout(10):
            while await victim.receive():
                pass
        await victim.aclose()
        await bystander.send(b"after")
        assert await bystander.receive() == b"after"
        assert not running.task.done(), "the agent must survive an endpoint reset"
        await bystander.aclose()
    await stack.wait_idle()


async def test_data_toward_clients_is_cut_to_frontend_data_bytes(pki, short_tmp) -> None:
    stack = await Stack(pki, short_tmp, frontend_data_bytes=32 << 10).start()
    try:
        await stack.add_agent(read_chunk_bytes=256 << 10)
        size = 8 << 20
        async with endpoint(source_handler(size)) as source:
            tunnel = await open_tunnel(source.address, uds_path=stack.uds)
            sizes, digest = [], hashlib.sha256()
            while chunk := await tunnel.receive():
                sizes.append(len(chunk))
                digest.update(chunk)
            await tunnel.aclose()
        assert sum(sizes) == size and digest.hexdigest() == expected_sha256(size)
        assert max(sizes) == 32 << 10, max(sizes)
        await stack.wait_idle()
    finally:
        await stack.stop()
