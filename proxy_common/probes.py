"""Health, readiness, metrics and debug listeners: one small HTTP/1.1 server on asyncio + h11.

SHELL. Both binaries run two listeners each, as the reference does:

* server health (`--health-port`, 8092): /healthz, /readyz (and the deprecated /ready), /metrics
* server admin (`--admin-port`, 8095): /metrics, and our debug pages
* agent health (`--health-server-port`, 8093): /healthz, /readyz, /ready, /metrics
* agent admin (`--admin-server-port`, 8094): /metrics as a 301 to the health port, debug pages

What each listener answers is a pure routing function `respond(Request) -> Response`, built
here from callables the application injects (readiness, metrics rendering, debug views).
Bodies, statuses and headers are the reference's, as recorded from the Go binaries
(tests/interop/server-behaviour.md): Go's `ServeMux` 404 page, the plain-text readiness
bodies, the agent's check list, the promhttp content type.

`ProbeServer` is the I/O around one routing function: one task per connection (owned
and cancelled on close), keep-alive, a bounded header size, a deadline for every request
(header and body) and every response write, a bounded request body and a bounded number
of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("proxy_common.probes")

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
JSON = "application/json"
# What the Go binaries' promhttp handler sends (recorded).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"
NO_AGENT_BODY = b"no connection to any proxy agent"
NOT_FOUND_BODY = b"404 page not found\n"
NO_SERVERS = "no servers connected"

READ_CHUNK = 16 << 10


# ------------------------------------------------------------------------ messages
@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    host: str = ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def has_query_key(self, key: str) -> bool:
        return any(part.split("=", 1)[0] == key for part in self.query.split("&") if part)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = TEXT
    headers: tuple[tuple[str, str], ...] = ()


Respond = Callable[[Request], Response]
Page = Callable[[Request], Response]


def ok() -> Response:
    return Response(200, b"ok")


def not_found() -> Response:
    """Go's http.NotFound."""
    return Response(404, NOT_FOUND_BODY, TEXT, (("X-Content-Type-Options", "nosniff"),))


def json_page(value: Any) -> Response:
    return Response(200, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n", JSON)


def redirect(request: Request, location: str, status: int = 301) -> Response:
    """Go's http.Redirect: a small HTML body for GET, none otherwise."""
    if request.method not in ("GET", "HEAD"):
        return Response(status, b"", None, (("Location", location),))
    body = f'<a href="{_html_escape(location)}">{http.HTTPStatus(status).phrase}</a>.\n\n'.encode()
    return Response(status, body, HTML, (("Location", location),))


def _html_escape(text: str) -> str:
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&#34;"), ("'", "&#39;")):
        text = text.replace(raw, escaped)
    return text


def split_host(host_header: str) -> str:
    """The host part of a Host header (Go's net.SplitHostPort, falling back to the whole)."""
    if host_header.startswith("["):
        end = host_header.find("]")
        if end > 0 and (host_header[end + 1 :] == "" or host_header[end + 1 :].startswith(":")):
            return host_header[1:end]
        return host_header
    if host_header.count(":") == 1:
        return host_header.rsplit(":", 1)[0]
    return host_header


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------- pages
class MetricsPage:
    """/metrics as promhttp serves it, counting its own scrapes as promhttp does.

    One instance per process, shared by the health and admin listeners, like the Go
    binaries' single instrumented handler.
    """

    def __init__(self, render: Callable[[], bytes], registry: CollectorRegistry) -> None:
        self._render = render
        self._scrapes = Counter(
            "promhttp_metric_handler_requests", "Total number of scrapes by HTTP status code.",
            ["code"], registry=registry,
        )
        for code in ("200", "500", "503"):
            self._scrapes.labels(code)
        self._in_flight = Gauge(
            "promhttp_metric_handler_requests_in_flight", "Current number of scrapes being served.",
            registry=registry,
        )

    def __call__(self, request: Request) -> Response:
        self._in_flight.inc()
        try:
            body = self._render()
        except Exception:
            log.exception("cannot render metrics")
            self._scrapes.labels("500").inc()
            return Response(500, b"An error has occurred while serving metrics.\n")
        finally:
            self._in_flight.dec()
        self._scrapes.labels("200").inc()
        return Response(200, body, METRICS_CONTENT_TYPE)


def debug_pages(sources: Mapping[str, Callable[[], Any]]) -> dict[str, Page]:
    """JSON debug pages: `/debug` with every source, `/debug/<name>` with one."""

    def everything(_request: Request) -> Response:
        return json_page({name: source() for name, source in sources.items()})

    pages: dict[str, Page] = {"/debug": everything, "/debug/": everything}
    for name, source in sources.items():
        pages[f"/debug/{name}"] = lambda _request, source=source: json_page(source())
    return pages


def routes(pages: Mapping[str, Page]) -> Respond:
    """Exact-path routing, any method, 404 otherwise (Go's ServeMux for exact patterns)."""

    def respond(request: Request) -> Response:
        page = pages.get(request.path)
        return page(request) if page is not None else not_found()

    return respond


# ------------------------------------------------------- the four listeners' routes
def server_health_routes(ready: Callable[[], bool], metrics: Page) -> Respond:
    def readiness(_request: Request) -> Response:
        return ok() if ready() else Response(500, NO_AGENT_BODY)

    return routes({"/healthz": lambda _r: ok(), "/readyz": readiness, "/ready": readiness, "/metrics": metrics})


def server_admin_routes(metrics: Page, debug: Mapping[str, Callable[[], Any]]) -> Respond:
    return routes({"/metrics": metrics, **debug_pages(debug)})


def agent_readiness(connected: Callable[[], bool]) -> Page:
    """The agent's check list: `ping` always passes, `server-connected` needs a server."""

    def readiness(request: Request) -> Response:
        checks = (("ping", None), ("server-connected", None if connected() else NO_SERVERS))
        lines = [f"[-]{name} failed: {err}\n" if err else f"[+]{name} ok\n" for name, err in checks]
        if any(err for _name, err in checks):
            return Response(503, "".join(lines).encode())
        if not request.has_query_key("verbose"):
            return ok()
        return Response(200, ("".join(lines) + "check passed\n").encode())

    return readiness


def agent_health_routes(connected: Callable[[], bool], metrics: Page) -> Respond:
    readiness = agent_readiness(connected)
    return routes({"/healthz": lambda _r: ok(), "/readyz": readiness, "/ready": readiness, "/metrics": metrics})


def agent_admin_routes(health_port: int, debug: Mapping[str, Callable[[], Any]]) -> Respond:
    """/metrics moved to the health port: same host as asked for, scheme-relative."""

    def moved(request: Request) -> Response:
        target = "//" + join_host_port(split_host(request.host), health_port) + request.path
        if request.query:
            target += "?" + request.query
        return redirect(request, target)

    return routes({"/metrics": moved, **debug_pages(debug)})


# ------------------------------------------------------------------------ server
class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class ProbeServer:
    """One HTTP/1.1 listener serving a routing function."""

    def __init__(
        self,
        name: str,
        respond: Respond,
        *,
        host: str,
        port: int,
        header_timeout: float = 60.0,
        max_header_bytes: int = 64 << 10,
        max_body_bytes: int = 64 << 10,
        max_connections: int = 64,
    ) -> None:
        self.name = name
        self.respond = respond
        self.host, self.port = host, port
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def address(self) -> str:
        return join_host_port(self.host or "::", self.port)

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        sock = await _listening_socket(self.host, self.port)
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=READ_CHUNK)
        self.port = sock.getsockname()[1]
        log.info("%s listener started address=%s", self.name, self.address)
        return self.port

    async def aclose(self) -> None:
        """Stop listening and end every open connection."""
        self._closing = True
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        log.info("%s listener stopped address=%s", self.name, self.address)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing or len(self._tasks) >= self.max_connections:
            writer.transport.abort()
            return
        self._tasks.add(task)  # type: ignore[arg-type]
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        try:
            await self._exchange_all(conn, reader, writer)
        except (_BadRequest, h11.RemoteProtocolError) as exc:
            status = exc.status if isinstance(exc, _BadRequest) else exc.error_status_hint
            await self._refuse(conn, writer, status)
        except (ConnectionError, TimeoutError, h11.LocalProtocolError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _exchange_all(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            async with asyncio.timeout(self.header_timeout):
                request = await self._read_request(conn, reader)
            if request is None:
                return
            response = self._answer(request)
            async with asyncio.timeout(self.header_timeout):
                await self._write(conn, writer, request, response)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise _BadRequest(400)
        host = next((value.decode("latin-1") for name, value in event.headers if name == b"host"), "")
        request = Request(event.method.decode("ascii"), event.target.decode("latin-1"), host)
        body = 0
        while not isinstance(part := await _next_event(conn, reader), h11.EndOfMessage):
            if isinstance(part, h11.ConnectionClosed):
                return None
            if isinstance(part, h11.Data):
                body += len(part.data)
                if body > self.max_body_bytes:
                    raise _BadRequest(413)
        return request

    def _answer(self, request: Request) -> Response:
        try:
            response = self.respond(request)
        except Exception:
            log.exception("%s page failed path=%s", self.name, request.path)
            response = Response(500, b"Internal Server Error\n")
        log.debug("%s request method=%s path=%s status=%d", self.name, request.method, request.path, response.status)
        return response

    async def _write(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: Request, response: Response) -> None:
        headers = [("Date", email.utils.formatdate(usegmt=True))]
        if response.content_type is not None:
            headers.append(("Content-Type", response.content_type))
        headers += [*response.headers, ("Content-Length", str(len(response.body)))]
        reason = http.HTTPStatus(response.status).phrase.encode()
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason)))
        if response.body and request.method != "HEAD":
            writer.write(conn.send(h11.Data(data=response.body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _refuse(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int) -> None:
        """Answer a request we cannot parse, as Go does, then close."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        text = f"{status} {http.HTTPStatus(status).phrase}".encode()
        headers = [("Content-Type", TEXT), ("Connection", "close"), ("Content-Length", str(len(text)))]
        with contextlib.suppress(ConnectionError, TimeoutError, h11.LocalProtocolError):
            async with asyncio.timeout(1.0):
                writer.write(conn.send(h11.Response(status_code=status, headers=headers,
                                                    reason=http.HTTPStatus(status).phrase.encode())))
                writer.write(conn.send(h11.Data(data=text)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await reader.read(READ_CHUNK))
    return event


async def _listening_socket(host: str, port: int) -> socket.socket:
    """Listen on `host` (first address it resolves to) or, when empty, on every address of
    both families with one port, like Go's net.Listen("tcp", ":port")."""
    if not host:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            return _bind(socket.socket(socket.AF_INET, socket.SOCK_STREAM), ("0.0.0.0", port))
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return _bind(sock, ("::", port))
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    return _bind(socket.socket(family, kind, proto), address)


def _bind(sock: socket.socket, address: Any) -> socket.socket:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
