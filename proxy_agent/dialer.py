"""Opening node-side TCP connections, with the reference agent's error texts.

SHELL. kube-apiserver shows dial errors to users and the HTTP-CONNECT frontend maps them
to status codes by substring, so failures are reported in Go's `net` wording:
`dial tcp 127.0.0.1:1: connect: connection refused`, `dial tcp 10.0.0.1:80: i/o timeout`,
`dial tcp: lookup nonexist.invalid: no such host`, `dial tcp: address 127.0.0.1: missing
port in address`, `dial bogus: unknown network bogus`.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from proxy_common.errors import DialError

DIAL_TIMEOUT_SECONDS = 5.0
TCP_NETWORKS = {"tcp": socket.AF_UNSPEC, "tcp4": socket.AF_INET, "tcp6": socket.AF_INET6}

_CONNECT_ERRORS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ENETUNREACH: "network is unreachable",
    errno.EHOSTUNREACH: "no route to host",
    errno.ECONNRESET: "connection reset by peer",
    errno.ETIMEDOUT: "connection timed out",
    errno.EADDRNOTAVAIL: "cannot assign requested address",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in system",
    errno.EACCES: "permission denied",
    errno.ENETDOWN: "network is down",
}


def split_host_port(address: str, network: str = "tcp") -> tuple[str, str]:
    """Go's net.SplitHostPort, with its error texts."""

    def fail(why: str) -> DialError:
        return DialError(f"dial {network}: address {address}: {why}")

    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise fail("missing ']' in address")
        host, rest = address[1:end], address[end + 1 :]
        if not rest.startswith(":"):
            raise fail("missing port in address")
        port = rest[1:]
        if ":" in port:
            raise fail("too many colons in address")
        return host, port
    if ":" not in address:
        raise fail("missing port in address")
    host, port = address.rsplit(":", 1)
    if ":" in host:
        raise fail("too many colons in address")
    return host, port


async def resolve_port(port: str, network: str) -> int:
    if port.isdigit():
        value = int(port)
        if value <= 65535:
            return value
        raise DialError(f"dial {network}: address {port}: invalid port")
    try:
        return socket.getservbyname(port, "tcp")
    except OSError:
        raise DialError(f"dial {network}: lookup {network}/{port}: unknown port") from None


async def open_tcp(
    protocol: str, address: str, *, timeout: float = DIAL_TIMEOUT_SECONDS, limit: int = 1 << 20
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial `address` over `protocol` within `timeout` seconds. Raises DialError."""
    if protocol not in TCP_NETWORKS:
        raise DialError(f"dial {protocol}: unknown network {protocol}" if protocol else "dial: unknown network ")
    host, port_text = split_host_port(address, protocol)
    port = await resolve_port(port_text, protocol)
    try:
        async with asyncio.timeout(timeout):
            infos = await _resolve(host, port, protocol)
            return await _connect_first(infos, protocol, address, limit)
    except TimeoutError:
        raise DialError(f"dial {protocol} {address}: i/o timeout", timed_out=True) from None


async def _resolve(host: str, port: int, protocol: str) -> list[tuple[int, tuple[str, int]]]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host or None, port, family=TCP_NETWORKS[protocol], type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        why = "no such host" if exc.errno in (socket.EAI_NONAME, socket.EAI_NODATA) else "server misbehaving"
        if exc.errno == socket.EAI_AGAIN:
            why = "temporary failure in name resolution"
        raise DialError(f"dial {protocol}: lookup {host}: {why}") from None
    return [(family, sockaddr[:2]) for family, _, _, _, sockaddr in infos]


async def _connect_first(
    infos: list[tuple[int, tuple[str, int]]], protocol: str, address: str, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    last: OSError | None = None
    tried = address
    for _family, (ip, port) in infos:
        tried = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"  # Go names the resolved address
        try:
            reader, writer = await asyncio.open_connection(ip, port, limit=limit)
        except OSError as exc:
            last = exc
            continue
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer
    assert last is not None
    why = _CONNECT_ERRORS.get(last.errno or 0, (last.strerror or str(last)).lower())
    raise DialError(f"dial {protocol} {tried}: connect: {why}")
