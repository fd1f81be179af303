"""A raw HTTP-CONNECT client for tests and benchmarks, and the Go recordings it is held to.

Everything is a real socket: a Unix socket, or TCP with TLS and a client certificate.
The recordings are read from tests/interop/client-http-connect.txt (bytes the Go
proxy-test-client sent, and bytes the Go proxy-server answered).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy_common.certs import DemoPki
from tests.harness import ROOT, Stack, wait_for

RECORDING = ROOT / "tests" / "interop" / "client-http-connect.txt"
RECORDED_TARGET = b"127.0.0.1:18400"
READ_BYTES = 1 << 20


# ------------------------------------------------------------------- recordings
def _recording() -> str:
    return RECORDING.read_text()


def recorded_go_client_request() -> bytes:
    """The 78 bytes the Go proxy-test-client sends (target 127.0.0.1:18400)."""
    part1 = _recording().split("PART 2", 1)[0]
    match = re.search(r"^base64: (\S+)$", part1, re.M)
    assert match, "recording has no request bytes"
    return base64.b64decode(match.group(1))


def recorded_go_client_tunneled_get() -> bytes:
    """The GET the Go client sent through the tunnel after the 200 (notation decoded)."""
    part1 = _recording().split("PART 2", 1)[0]
    block = part1.split("Tunneled bytes the client sent after the 200 (first case):", 1)[1]
    block = block.split("Which responses", 1)[0]
    text = "".join(line.strip() for line in block.splitlines() if line.strip())
    return text.replace("\\r", "\r").replace("\\n", "\n").encode()


def recorded_server_responses() -> dict[str, bytes]:
    """Section title (without '## ') -> the exact bytes the Go server answered."""
    part2 = _recording().split("PART 2", 1)[1]
    answers = {}
    for section in re.split(r"^## ", part2, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        match = re.search(r"^response base64: (\S+)$", section, re.M)
        if match:
            answers[title] = base64.b64decode(match.group(1))
    return answers


def recorded(prefix: str) -> bytes:
    found = [raw for title, raw in recorded_server_responses().items() if title.startswith(prefix)]
    assert len(found) == 1, f"no single recorded response titled {prefix!r}"
    return found[0]


# ----------------------------------------------------------------------- access
def client_tls(
    pki: DemoPki, cert: Path | None = None, key: Path | None = None, *, ca: Path | None = None
) -> ssl.SSLContext:
    """A client TLS context trusting the demo CA, presenting `cert`/`key` (the demo client's by default)."""
    context = ssl.create_default_context(cafile=str(ca or pki.ca_cert))
    context.set_alpn_protocols(["http/1.1"])
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


@dataclass
class Access:
    """How a client reaches the HTTP-CONNECT frontend: its Unix socket, or TCP with TLS."""

    kind: str
    uds: str = ""
    port: int = 0
    tls: ssl.SSLContext | None = None
    opened: list[asyncio.StreamWriter] = field(default_factory=list)

    async def open(self, tls: ssl.SSLContext | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.kind == "uds":
            reader, writer = await asyncio.open_unix_connection(self.uds, limit=READ_BYTES)
        else:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.port, ssl=tls or self.tls, server_hostname="127.0.0.1", limit=READ_BYTES
            )
        self.opened.append(writer)
        return reader, writer

    async def open_raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain socket to the frontend, even when it expects TLS (for hostile clients)."""
        if self.kind == "uds":
            return await self.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=READ_BYTES)
        self.opened.append(writer)
        return reader, writer

    async def close_all(self) -> None:
        for writer in self.opened:
            await shut(writer)
        self.opened.clear()


def tls_server_overrides(pki: DemoPki) -> dict[str, Any]:
    return {
        "uds_name": "",
        "server_port": 0,
        "server_bind_address": "127.0.0.1",
        "server_cert": str(pki.server_cert),
        "server_key": str(pki.server_key),
        "server_ca_cert": str(pki.ca_cert),
    }


@contextlib.asynccontextmanager
async def http_connect_stack(
    pki: DemoPki, tmp: Path, kind: str, **overrides: Any
) -> AsyncIterator[tuple[Stack, Access]]:
    """A proxy-server in http-connect mode on `kind` ("uds" or "tls"); at exit, everything is released."""
    fields = {"mode": "http-connect", "frontend_header_timeout": 10.0, **overrides}
    if kind == "tls":
        fields.update(tls_server_overrides(pki))
    stack = await Stack(pki, tmp, **fields).start()
    access = Access(
        kind,
        uds=stack.uds,
        port=stack.server.frontend_port,
        tls=client_tls(pki, pki.client_cert, pki.client_key) if kind == "tls" else None,
    )
    try:
        yield stack, access
        await access.close_all()
        await settled(stack)
    finally:
        await access.close_all()
        await stack.stop()


async def settled(stack: Stack, timeout: float = 10.0) -> None:
    """No frontend, no connection task, no open HTTP connection, empty tables."""
    server = stack.server
    frontend = server._http
    await wait_for(
        lambda: (
            not server.board.frontends
            and (frontend is None or frontend.connection_count == 0)
            and http_connections(stack) == 0
        ),
        timeout=timeout,
        what="HTTP-CONNECT frontends released",
    )
    await stack.wait_idle(timeout)


def http_connections(stack: Stack) -> float:
    return stack.server.metrics.http_connections._value.get()


# ---------------------------------------------------------------------- client
def connect_request(target: str | bytes, user_agent: bytes = b"test-client") -> bytes:
    """What the Go client (and kube-apiserver, without User-Agent) sends."""
    if isinstance(target, str):
        target = target.encode()
    return b"CONNECT " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + user_agent + b"\r\n\r\n"


async def connect(
    access: Access, target: str, early: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a socket, send CONNECT (and `early` bytes in the same write), return the response head."""
    reader, writer = await access.open()
    writer.write(connect_request(target) + early)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    return reader, writer, head


async def read_all(reader: asyncio.StreamReader, timeout: float = 20.0) -> bytes:
    """Everything until EOF (bounded in time)."""
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(READ_BYTES):
            chunks.append(chunk)
    return b"".join(chunks)


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close a client socket for sure (bounded)."""
    writer.close()
    try:
        async with asyncio.timeout(5):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except (ConnectionError, ssl.SSLError):
        pass


class blackhole:
    """A loopback port whose accept queue is full, so new connections hang in SYN_SENT."""

    async def __aenter__(self) -> int:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        port = self.listener.getsockname()[1]
        self.filler = socket.socket()
        self.filler.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(self.filler, ("127.0.0.1", port)), 5)
        return port

    async def __aexit__(self, *exc: object) -> None:
        self.filler.close()
        self.listener.close()
