"""Test harness: real servers, agents and endpoints on loopback, and leak accounting.

Everything here is real: grpc.aio servers on Unix and TCP sockets, TLS with certificates
made per test session, TCP endpoints served by asyncio. Helpers wait for conditions with
a deadline; none sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from proxy_agent.app import ProxyAgent
from proxy_agent.config import AgentConfig
from proxy_common.certs import DemoPki
from proxy_common.client import Tunnel, TunnelDialError, open_tunnel
from proxy_server.app import ProxyServer
from proxy_server.config import ServerConfig
from proxy_server.router import NO_AGENT_ERROR

ROOT = Path(__file__).resolve().parent.parent
SERVER = "konnectivity_network_proxy_server_"  # the metric name prefixes, as the reference spells them
AGENT = "konnectivity_network_proxy_agent_"


async def wait_for(predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until true; fail with `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def socket_fds() -> set[str]:
    """Inodes of this process's open TCP sockets and named Unix sockets.

    Unnamed Unix socket pairs are left out: grpc's C core keeps a few for its own event
    engine, created and closed on its own schedule, and they carry no traffic of ours.
    """
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return {name for name in found if name[len("socket:[") : -1] in _tracked_inodes()}


def _tracked_inodes() -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as handle:
            next(handle)
            inodes.update(line.split()[9] for line in handle)
    with open("/proc/net/unix") as handle:
        next(handle)
        inodes.update(fields[6] for fields in map(str.split, handle) if len(fields) > 7)
    return inodes


def describe_sockets(sockets: set[str]) -> list[str]:
    """What /proc/net says about the given socket inodes (for leak reports)."""
    inodes = {name[len("socket:[") : -1] for name in sockets}
    lines = []
    for table in ("unix", "tcp", "tcp6"):
        with open(f"/proc/net/{table}") as handle:
            for line in handle:
                fields = line.split()
                if inodes & set(fields):
                    lines.append(f"{table}: {line.strip()}")
    return lines


# ------------------------------------------------------------------------ endpoints
@dataclasses.dataclass
class Endpoint:
    """A loopback TCP server whose open connections are counted."""

    server: asyncio.AbstractServer
    port: int
    open_connections: int = 0
    accepted: int = 0
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def endpoint(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[Endpoint]:
    ep: Endpoint | None = None
    tasks: set[asyncio.Task[Any]] = set()

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert ep is not None
        ep.open_connections += 1
        ep.accepted += 1
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
            writer.close()  # flushes what the handler wrote, then closes
            await asyncio.wait_for(writer.wait_closed(), 10)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.transport.abort()
            ep.open_connections -= 1
            tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    server = await asyncio.start_server(counted, host, 0, limit=1 << 20)
    ep = Endpoint(server, server.sockets[0].getsockname()[1], host=host)
    try:
        yield ep
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 18):
        writer.write(data)
        await writer.drain()


async def http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every GET with a small page naming the path (one request per connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    path = head.split(b" ", 2)[1].decode()
    body = f"<html><body>hello from {path}</body></html>".encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


def assert_page(response: bytes, path: str = "/success") -> None:
    """`response` is http_handler's whole answer to a GET of `path`."""
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(f"hello from {path}</body></html>".encode())


async def sink_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads everything, then answers with the sha256 hex of what it read and closes."""
    digest = hashlib.sha256()
    while data := await reader.read(1 << 18):
        digest.update(data)
    writer.write(digest.hexdigest().encode())
    await writer.drain()


async def sized_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads an 8-byte length, then that many bytes, and answers their sha256 hex."""
    (size,) = struct.unpack("!Q", await reader.readexactly(8))
    digest = hashlib.sha256()
    remaining = size
    while remaining:
        data = await reader.read(min(remaining, 1 << 20))
        if not data:
            raise ConnectionError("short upload")
        digest.update(data)
        remaining -= len(data)
    writer.write(digest.hexdigest().encode())
    await writer.drain()


async def echo(tunnel: Tunnel, payload: bytes) -> None:
    """Send `payload` through an open tunnel to an echo endpoint; it comes back whole."""
    await tunnel.send(payload)
    received = b""
    while len(received) < len(payload):
        chunk = await tunnel.receive()
        assert chunk, "tunnel closed during the transfer"
        received += chunk
    assert received == payload


async def echo_once(uds: str, address: str, payload: bytes) -> None:
    """One tunnel through the server listening at `uds` to the echo endpoint at `address`."""
    async with await open_tunnel(address, uds_path=uds) as tunnel:
        await echo(tunnel, payload)


def source_handler(size: int, seed: bytes = b"seed") -> Handler:
    """Sends `size` deterministic bytes, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for chunk in deterministic_chunks(size, seed):
            writer.write(chunk)
            await writer.drain()

    return handle


def deterministic_chunks(size: int, seed: bytes = b"seed", chunk: int = 1 << 20) -> list[bytes] | Any:
    block = hashlib.shake_256(seed).digest(chunk)
    sent = 0
    while sent < size:
        piece = block[: min(chunk, size - sent)]
        sent += len(piece)
        yield piece


def expected_sha256(size: int, seed: bytes = b"seed") -> str:
    digest = hashlib.sha256()
    for piece in deterministic_chunks(size, seed):
        digest.update(piece)
    return digest.hexdigest()


# --------------------------------------------------------------------------- stack
def server_config(pki: DemoPki, tmp: Path, **overrides: Any) -> ServerConfig:
    fields: dict[str, Any] = {
        "uds_name": str(tmp / "proxy.sock"),
        "server_port": 0,
        "agent_port": 0,
        "agent_bind_address": "127.0.0.1",
        "cluster_cert": str(pki.server_cert),
        "cluster_key": str(pki.server_key),
        "server_id": "test-server",
        "health_port": 0,
        "admin_port": 0,
        "health_bind_address": "127.0.0.1",
    }
    fields.update(overrides)
    return ServerConfig(**fields)


def agent_config(pki: DemoPki, port: int, **overrides: Any) -> AgentConfig:
    fields: dict[str, Any] = {
        "proxy_server_host": "127.0.0.1",
        "proxy_server_port": port,
        "ca_cert": str(pki.ca_cert),
        "agent_id": "test-agent",
        "sync_interval": 0.1,
        "sync_interval_cap": 0.5,
        "probe_interval": 0.2,
        "health_server_port": 0,
        "admin_server_port": 0,
        "health_server_host": "127.0.0.1",
    }
    fields.update(overrides)
    return AgentConfig(**fields)


class RunningAgent:
    """An in-process agent run as a task, stopped by cancellation."""

    def __init__(self, config: AgentConfig) -> None:
        self.agent = ProxyAgent(config)
        self.task: asyncio.Task[None] = asyncio.create_task(self.agent.run(), name=f"test-agent {config.agent_id}")

    def connection_count(self) -> int:
        return sum(len(s.table) for s in self.agent.clients.sessions.values())

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Stack:
    """A proxy-server plus any number of in-process agents."""

    def __init__(self, pki: DemoPki, tmp: Path, **server_overrides: Any) -> None:
        self.pki = pki
        self.tmp = tmp
        self.server = ProxyServer(server_config(pki, tmp, **server_overrides))
        self.agents: list[RunningAgent] = []

    @property
    def uds(self) -> str:
        return self.server.config.uds_name

    async def start(self) -> Stack:
        await self.server.start()
        return self

    async def add_agent(self, wait: bool = True, **overrides: Any) -> RunningAgent:
        before = len(self.server.registry)
        running = RunningAgent(agent_config(self.pki, self.server.agent_port, **overrides))
        self.agents.append(running)
        if wait:
            await wait_for(lambda: len(self.server.registry) > before, what="agent registration")
        return running

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the server's and every agent's tables are empty."""
        await wait_for(
            lambda: self.server.router.is_empty() and all(a.connection_count() == 0 for a in self.agents),
            timeout=timeout,
            what="empty connection tables",
        )

    async def stop(self) -> None:
        for running in self.agents:
            await running.stop()
        await self.server.stop(0)


def server_metric(server: ProxyServer, name: str, **labels: str) -> float:
    """A sample of a server's `konnectivity_network_proxy_server_<name>` (0 when it has none)."""
    return server.metrics.registry.get_sample_value(SERVER + name, labels) or 0.0


def agent_metric(running: RunningAgent, name: str, **labels: str) -> float:
    """A sample of an agent's `konnectivity_network_proxy_agent_<name>` (0 when it has none)."""
    return running.agent.metrics.registry.get_sample_value(AGENT + name, labels) or 0.0


Connect = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def agent_service_server(pki: DemoPki, connect: Connect) -> tuple[grpc.aio.Server, int]:
    """A scripted proxy-server for agent tests: a grpc.aio server (not started) whose
    AgentService/Connect runs `connect`, on a loopback TLS port with the demo server
    certificate. Returns the server and its port."""
    server = grpc.aio.server()
    method = grpc.stream_stream_rpc_method_handler(connect)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("AgentService", {"Connect": method}),))
    creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    return server, server.add_secure_port("127.0.0.1:0", creds)


async def assert_no_agent_gets_a_dial(stack: Stack) -> None:
    """No agent is registered: a dial fails with the reference's error and reaches no endpoint."""
    assert len(stack.server.registry) == 0
    async with endpoint(echo_handler) as ep:
        with pytest.raises(TunnelDialError, match=f"^{NO_AGENT_ERROR}$"):
            await open_tunnel(ep.address, uds_path=stack.uds)
        assert ep.accepted == 0


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
