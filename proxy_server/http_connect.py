"""HTTP-CONNECT frontend (`--mode=http-connect`): one CONNECT request, one tunnel, per socket.

SHELL. Listens on the frontend Unix socket, or on TCP with TLS that requires a client
certificate. Each accepted socket is served by one task:

1. The request head is parsed with h11, bounded in size (`MAX_HEADER_BYTES`, 431 past it)
   and in time (`header_timeout` for the TLS handshake, then again for the whole head; a
   client that sends nothing or never finishes is closed without an answer, as Go's is).
   A malformed head gets 400 and the socket is closed (a CONNECT without Host is not
   malformed: Go accepts it). A request that is not CONNECT
   gets the reference's 405 and the connection stays open for the next request.
2. A CONNECT registers a frontend on the switchboard and sends it a DIAL_REQ for the
   request target; from then on the router decides, as for a gRPC `Proxy` stream.
3. One writer drains the frontend's mailbox onto the socket (`http_responses.reply_to`
   says what each message means: 200, an error answer, raw bytes, or the end); once the
   200 is written, one reader sends what the client writes (bytes pipelined after the
   head first) as DATA of at most `TUNNEL_READ_BYTES`. Whichever ends first ends the
   other; the socket is closed and `close_frontend` releases the dial or the connection
   (one CLOSE_REQ or DIAL_CLS to the agent).

A writer blocked on a client that stopped reading is cut off once the router has given
up on that client (mailbox closed) and no progress was made for `stall_limit` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import secrets
import socket
import ssl
import time
from typing import Any

import h11

from proxy_common.messages import Data, DialRequest
from proxy_common.tasks import race
from proxy_server import http_responses as answers
from proxy_server.switchboard import Link, Switchboard

log = logging.getLogger("proxy_server.http_connect")

RECEIVE_BYTES = 64 << 10
STREAM_LIMIT = 256 << 10
CLOSE_FLUSH_SECONDS = 5.0
LINGER_SECONDS = 0.5  # like Go's rstAvoidanceDelay: let the client read an error answer


class _ClientGone(Exception):
    """The client closed or broke its socket; nothing more can be written to it."""


class _Refused(Exception):
    """The request head cannot be served; `answer` (may be empty) is written, then close."""

    def __init__(self, answer: bytes, why: str) -> None:
        super().__init__(why)
        self.answer = answer


def bind_unix(path: str, mode: int) -> socket.socket:
    """A listening-ready Unix socket at `path` created with `mode` (never wider, not even briefly)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return sock


class HttpConnectFrontend:
    """The listener and its connection tasks (owned: `aclose()` ends every one)."""

    def __init__(
        self,
        board: Switchboard,
        *,
        header_timeout: float,
        tls: ssl.SSLContext | None = None,
        stall_limit: float = 5.0,
    ) -> None:
        self.board = board
        self.header_timeout = header_timeout
        self.tls = tls
        self.stall_limit = stall_limit
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def listen_unix(self, path: str, mode: int) -> None:
        sock = bind_unix(path, mode)
        try:
            self._server = await asyncio.start_unix_server(self._accepted, sock=sock, limit=STREAM_LIMIT)
        except BaseException:
            sock.close()
            raise
        log.info("frontend listening mode=http-connect uds=%s", path)

    async def listen_tcp(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._accepted,
            host or None,
            port,
            ssl=self.tls,
            limit=STREAM_LIMIT,
            ssl_handshake_timeout=self.header_timeout if self.tls else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("frontend listening mode=http-connect address=%s:%d mtls=%s", host, self.port, self.tls is not None)
        return self.port

    async def aclose(self, grace: float | None = None) -> None:
        """Stop accepting; give open connections `grace` seconds, then end them."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        if grace and self._connections:
            await asyncio.wait(set(self._connections), timeout=grace)
        while self._connections:
            pending = set(self._connections)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._connections -= pending
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ per socket
    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A new socket: serve it in a task of our own (asyncio's stream callback task in
        3.11 reports a cancelled handler as an error, so the handler is not run there)."""
        if self._closing:
            writer.transport.abort()
            return
        peer = _peer_name(writer)
        task = asyncio.create_task(self._connection(reader, writer, peer), name=f"http-connect-connection peer={peer}")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        try:
            try:
                await self._serve(reader, writer, peer)
            except* (_ClientGone, ConnectionError, ssl.SSLError):
                pass
            except* Exception as group:  # our own bug: log it, never let it pass silently
                log.error("http-connect connection failed peer=%s", peer, exc_info=group)
        except BaseException:  # cancelled (the server is stopping): no flushing
            writer.transport.abort()
            raise
        await _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        conn = _parser()
        while True:
            try:
                async with asyncio.timeout(self.header_timeout):
                    request, conn = await _next_request(reader, conn)
            except TimeoutError:
                log.info("request head not received in time, closing peer=%s seconds=%s", peer, self.header_timeout)
                return
            except _Refused as refused:
                log.info("unreadable request, closing peer=%s why=%s", peer, refused)
                if refused.answer:
                    writer.write(refused.answer)
                    await _linger(reader, writer, self.header_timeout)
                return
            if request is None:
                return  # the client closed between requests
            target = answers.dial_target(request.method, request.target)
            if target is not None:
                await self._tunnel(reader, writer, peer, target, conn.trailing_data[0])
                return
            fresh = await self._refuse_method(reader, writer, conn, request, peer)
            if fresh is None:
                return
            conn = fresh

    async def _refuse_method(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: h11.Connection,
        request: h11.Request,
        peer: str,
    ) -> h11.Connection | None:
        """Answer a non-CONNECT request with 405; a fresh parser for the next request, or None."""
        self.board.metrics.http_connections.inc()
        try:
            log.info("method not allowed peer=%s method=%s", peer, request.method.decode("ascii", "replace"))
            keep = answers.keeps_alive(request.http_version, _header_values(request, b"connection"))
            close_header = not keep and request.http_version != b"1.0"
            writer.write(answers.method_not_allowed(email.utils.formatdate(usegmt=True), connection_close=close_header))
            try:
                async with asyncio.timeout(self.header_timeout):
                    await _drain(writer)
                    complete = keep and await _discard_body(reader, conn)
            except (TimeoutError, _Refused):
                return None
            if not complete:
                return None
            fresh = _parser()
            leftover, closed = conn.trailing_data
            if leftover:
                fresh.receive_data(leftover)
            if closed:
                fresh.receive_data(b"")  # h11 reads an empty chunk as end of input
            return fresh
        finally:
            self.board.metrics.http_connections.dec()

    async def _tunnel(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, target: str, early: bytes
    ) -> None:
        board = self.board
        frontend_id, link = board.open_frontend(f"http-connect peer={peer}")
        board.metrics.http_connections.inc()
        opened: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        dial_id = secrets.randbits(63)
        log.info("connect request peer=%s address=%s dial_id=%d", peer, target, dial_id)
        try:
            await board.from_frontend(frontend_id, DialRequest(dial_id=dial_id, address=target, protocol="tcp"))
            await race(
                self._write_loop(writer, link, opened),
                self._read_loop(reader, frontend_id, opened, early),
                names=(f"http-connect-writer id={frontend_id}", f"http-connect-reader id={frontend_id}"),
            )
        finally:
            opened.cancel()
            board.close_frontend(frontend_id)
            board.metrics.http_connections.dec()

    async def _write_loop(self, writer: asyncio.StreamWriter, link: Link, opened: asyncio.Future[int]) -> None:
        metrics = self.board.metrics
        observe = metrics.frontend_write_duration.observe
        while (message := await link.mailbox.get()) is not None:
            reply = answers.reply_to(message)
            if reply.data:
                if writer.transport.is_closing():  # the client went away (uvloop refuses the write)
                    raise _ClientGone
                started = time.perf_counter()
                writer.write(reply.data)
                await self._drain_or_give_up(writer, link)
                observe(time.perf_counter() - started)
            metrics.packet("to_client", message)
            if reply.opened_conn_id:
                opened.set_result(reply.opened_conn_id)
            if reply.then_close:
                return

    async def _drain_or_give_up(self, writer: asyncio.StreamWriter, link: Link) -> None:
        """Wait for the socket to take the bytes; give up on a client the router gave up on."""
        while True:
            try:
                async with asyncio.timeout(self.stall_limit):
                    await _drain(writer)
                return
            except TimeoutError:
                if link.mailbox.closed:
                    log.warning("client stopped reading after the tunnel ended, closing label=%s", link.label)
                    raise _ClientGone from None

    async def _read_loop(
        self, reader: asyncio.StreamReader, frontend_id: int, opened: asyncio.Future[int], early: bytes
    ) -> None:
        conn_id = await opened
        send = self.board.from_frontend
        for start in range(0, len(early), answers.TUNNEL_READ_BYTES):
            await send(frontend_id, Data(conn_id, early[start : start + answers.TUNNEL_READ_BYTES]))
        try:
            while data := await reader.read(answers.TUNNEL_READ_BYTES):
                await send(frontend_id, Data(conn_id, data))
        except (ConnectionError, ssl.SSLError):
            pass
        # EOF or a broken socket: returning ends the tunnel; close_frontend sends the CLOSE_REQ.


# ----------------------------------------------------------------------- helpers
def _parser() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=answers.MAX_HEADER_BYTES)


async def _next_request(
    reader: asyncio.StreamReader, conn: h11.Connection
) -> tuple[h11.Request | None, h11.Connection]:
    """The next request head (None when the client closed cleanly before sending one) and the
    parser holding what follows it (bytes pipelined after a CONNECT head).

    An HTTP/1.1 CONNECT without a Host header is served, as Go's net/http serves it (h11
    refuses it; the head is parsed again with the target as Host)."""
    received = bytearray(conn.trailing_data[0])  # this request's bytes so far (bounded by h11's limit)
    retried = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            patched = None if retried else answers.connect_without_host(bytes(received), str(exc))
            if patched is not None:
                conn, retried = _parser(), True
                conn.receive_data(patched)
                continue
            _, closed = conn.trailing_data
            code = 431 if exc.error_status_hint == 431 else 400
            answer = b"" if closed and code == 400 else answers.unreadable_request(code, str(exc))
            raise _Refused(answer, str(exc)) from None
        if event is h11.NEED_DATA:
            data = await _receive(reader)
            if not retried:
                received += data
            conn.receive_data(data)
        elif type(event) is h11.Request:
            return event, conn
        elif type(event) is h11.ConnectionClosed:
            return None, conn
        else:  # pragma: no cover - h11 yields nothing else before a request
            raise _Refused(answers.unreadable_request(400), f"unexpected {type(event).__name__}")


async def _discard_body(reader: asyncio.StreamReader, conn: h11.Connection) -> bool:
    """Read and drop a refused request's body; False if it is too long to bother."""
    dropped = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _Refused(b"", str(exc)) from None
        if event is h11.NEED_DATA:
            conn.receive_data(await _receive(reader))
        elif type(event) is h11.Data:
            dropped += len(event.data)
            if dropped > answers.MAX_DISCARDED_BODY_BYTES:
                return False
        else:
            return type(event) is h11.EndOfMessage


async def _receive(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(RECEIVE_BYTES)
    except (ConnectionError, ssl.SSLError):
        return b""


async def _drain(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except (ConnectionError, ssl.SSLError) as exc:
        raise _ClientGone from exc


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flush_limit: float) -> None:
    """Send an error answer, stop writing, and read a little so closing does not reset it."""
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError, _ClientGone):
        async with asyncio.timeout(flush_limit):
            await _drain(writer)
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(RECEIVE_BYTES):
                pass


async def _close(writer: asyncio.StreamWriter) -> None:
    """Flush what is queued (bounded), then close the socket for sure."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_FLUSH_SECONDS):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()  # the client does not take the rest: drop it
    except (ConnectionError, ssl.SSLError):
        pass  # closed underneath us: nothing left to flush
    except asyncio.CancelledError:
        writer.transport.abort()
        raise


def _header_values(request: h11.Request, name: bytes) -> list[bytes]:
    return [value for key, value in request.headers if key == name]


def _peer_name(writer: asyncio.StreamWriter) -> str:
    """`uds`, or `host:port`, with the client certificate's common name on TLS (as Go logs it)."""
    peer = writer.get_extra_info("peername")
    if not (isinstance(peer, tuple) and len(peer) >= 2):
        return "uds"
    name = f"{peer[0]}:{peer[1]}"
    subject = (writer.get_extra_info("peercert") or {}).get("subject", ())
    common_names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return f"{name} cn={common_names[0]}" if common_names else name
