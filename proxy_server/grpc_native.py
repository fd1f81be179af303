"""proxy-server's gRPC server (the frontend and the agent port): HTTP/2 by `h2_core`, on asyncio.

SHELL. One protocol object per connection feeds `h2_core.ServerConnection` and runs each
call's handler in a task of its own. Handlers get a `NativeCall`, which has the part of
grpc.aio's ServicerContext our servicers use (read, write, abort, peer, invocation_metadata,
send_initial_metadata), so the same servicers run here. Only streaming calls of raw bytes
(no serializers), as ProxyService and AgentService have.

Why: grpc.aio keeps about 23 KiB of server memory per held stream (38 KiB with a connection
of its own, as kube-apiserver dials); with this server a whole held tunnel costs about 6 KiB
(12 with its own connection), and each packet and dial much less CPU.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn, cast

import grpc
import grpc.aio

from proxy_server import h2_core
from proxy_server.h2_core import (
    CallEnded,
    CallStarted,
    ConnectionClosing,
    Drained,
    HalfClosed,
    MessageReceived,
    PingAcked,
)

log = logging.getLogger("proxy_server.grpc")
# hpack logs every decoded header at DEBUG: a client's credentials would reach the logs.
logging.getLogger("hpack").setLevel(logging.WARNING)

Handler = Callable[[Any, "NativeCall"], Awaitable[None]]

KEEPALIVE_TIMEOUT_SECONDS = 20.0  # grpc's default wait for a keepalive PING's answer
HANDSHAKE_SECONDS = 20.0  # a connection must have sent its preface and SETTINGS by then
CLOSE_SECONDS = 5.0  # a closing connection whose client does not read its last bytes is cut
# Per connection: above this many bytes unsent, writers wait and the client's input is not
# read (a client that sends PINGs but never reads their answers cannot grow our buffers).
WRITE_BUFFER_HIGH = 1 << 20
# Per connection: above this many bytes received for calls whose handlers have not read yet
# (calls still waiting for their authentication), the client's input is not read until
# they have caught up to half of it. Calls that read are bounded by their stream windows.
MAX_UNREAD_BYTES = 32 << 20


class CallGone(Exception):
    """The call ended (the client reset it, the connection went away) while we wrote."""


class _Aborted(Exception):
    """Raised by NativeCall.abort once the status is queued; the runner swallows it."""


# Request headers that are HTTP/2 or gRPC transport, not the caller's metadata (as grpc).
_NOT_METADATA = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})


def _metadata(fields: list[tuple[str, str]]) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata as grpc.aio gives it: `-bin` values base64-decoded."""
    return tuple(
        (name, base64.b64decode(value + "=" * (-len(value) % 4)) if name.endswith("-bin") else value)
        for name, value in fields
        if not name.startswith(":") and name not in _NOT_METADATA
    )


class NativeCall:
    """One call, as its handler sees it."""

    __slots__ = ("_connection", "_ended", "_eof", "_inbound", "_metadata", "_reader", "_writer", "stream_id", "task")

    def __init__(self, connection: _Connection, stream_id: int, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._metadata = metadata
        self._inbound: deque[bytes] = deque()
        self._eof = False
        self._ended = False
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def peer(self) -> str:
        return self._connection.peer

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """The response headers, now (before any message), with `metadata`."""
        fields = [
            (name.encode("ascii"), base64.b64encode(value).rstrip(b"=") if isinstance(value, bytes) else value.encode())
            for name, value in metadata
        ]
        if self._ended or not self._connection.core.respond(self.stream_id, fields):
            raise CallGone("the call has ended or its headers were sent")
        self._connection.flush_soon()

    async def read(self) -> Any:
        """The next message, or grpc.aio.EOF once the client ended its side."""
        while not self._inbound:
            if self._eof or self._ended:
                return grpc.aio.EOF
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        payload = self._inbound.popleft()
        connection = self._connection
        connection.core.consumed(self.stream_id, len(payload) + 5)
        connection.flush_soon()
        if connection.input_full:
            connection.check_input()
        return payload

    async def write(self, payload: bytes) -> None:
        connection = self._connection
        core = connection.core
        if self._ended or not core.send_message(self.stream_id, payload):
            raise CallGone("the call has ended")
        connection.flush_soon()
        while core.pending(self.stream_id) or connection.paused:
            self._writer = asyncio.get_running_loop().create_future()
            try:
                await self._writer
            finally:
                self._writer = None
            if self._ended:
                raise CallGone("the call ended while its output waited")

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        self._connection.end_call(self, code.value[0], details)
        raise _Aborted(details)

    # -- from the connection -------------------------------------------------------------

    def _deliver(self, payload: bytes) -> None:
        self._inbound.append(payload)
        self._wake_reader()

    def _half_closed(self) -> None:
        self._eof = True
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _wake_writer(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.set_result(None)

    def _end(self) -> None:
        """No more reading or writing on this call (the handler is being cancelled or ended).
        A waiting writer is woken first, so that it fails (and counts the failed write) before
        the handler's cleanup cancels it."""
        self._ended = True
        self._wake_writer()
        self._wake_reader()


class _Connection(asyncio.Protocol):
    def __init__(self, server: NativeGrpcServer) -> None:
        self.server = server
        self.core = h2_core.ServerConnection(max_message_bytes=server.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.calls: dict[int, NativeCall] = {}
        self.paused = False  # our writes wait: the client does not read fast enough
        self.input_full = False  # the calls' handlers have too much unread input
        self._reading = True
        self._flush_handle: asyncio.Handle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None  # handshake, then closing
        self._closing = False  # GOAWAY sent or received: close once the calls are done
        self._lost = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.peer = _peer_name(transport)
        self.server.connections.add(self)
        self.core.initiate()
        self._flush()
        self._arm_keepalive()
        self._deadline = asyncio.get_running_loop().call_later(HANDSHAKE_SECONDS, self._handshake_expired)
        if self.server.stopping:
            self.goaway()

    def data_received(self, data: bytes) -> None:
        core = self.core
        events = core.receive(data)
        if core.unread > MAX_UNREAD_BYTES and not self.input_full:
            self.input_full = True
            self._update_reading()
        if self._deadline is not None and core.started and not self._closing:
            self._deadline.cancel()
            self._deadline = None
        for event in events:
            kind = type(event)
            if kind is MessageReceived:
                call = self.calls.get(event.stream_id)  # type: ignore[union-attr]
                if call is not None:
                    call._deliver(event.payload)  # type: ignore[union-attr]
            elif kind is CallStarted:
                self._start_call(event)  # type: ignore[arg-type]
            elif kind is HalfClosed:
                call = self.calls.get(event.stream_id)  # type: ignore[union-attr]
                if call is not None:
                    call._half_closed()
            elif kind is Drained:
                call = self.calls.get(event.stream_id)  # type: ignore[union-attr]
                if call is not None:
                    call._wake_writer()
            elif kind is CallEnded:
                self._cancel_call(event.stream_id, event.reason)  # type: ignore[union-attr]
            elif kind is PingAcked:
                self._arm_keepalive()
            elif kind is ConnectionClosing:
                self._closing = True
                if event.code != h2_core.NO_ERROR:  # type: ignore[union-attr]
                    log.warning("%s connection error, closing peer=%s error=%s", self.server.name, self.peer, event.detail)  # type: ignore[union-attr]
                    self._flush()
                    self._abort_calls()
                    self._close()
                    return
        self._flush()
        self._close_if_done()

    def eof_received(self) -> bool:
        return False  # the client is gone: close, and connection_lost ends every call

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.paused = False
        for handle in (self._flush_handle, self._keepalive, self._deadline):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._keepalive = self._deadline = None
        self._abort_calls()
        self.server.connections.discard(self)
        self.server.connection_closed()

    def pause_writing(self) -> None:
        self.paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self._update_reading()
        for call in list(self.calls.values()):
            call._wake_writer()

    def check_input(self) -> None:
        """Read the client again once its calls' unread input is down to half the bound."""
        if self.input_full and self.core.unread <= MAX_UNREAD_BYTES // 2:
            self.input_full = False
            self._update_reading()

    def _update_reading(self) -> None:
        """The client's input is read unless our writes wait or its calls have too much unread."""
        wanted = not (self.paused or self.input_full)
        if wanted != self._reading and self.transport is not None and not self._lost:
            self._reading = wanted
            if wanted:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # -- calls ---------------------------------------------------------------------------

    def _start_call(self, event: CallStarted) -> None:
        handler = self.server.handlers.get(event.path)
        if handler is None:
            self.core.end_call(event.stream_id, h2_core.UNIMPLEMENTED, f"Method not found: {event.path}")
            return
        try:
            metadata = _metadata(event.fields)
        except ValueError:  # binascii.Error: a -bin header that is not base64
            self.core.end_call(event.stream_id, h2_core.INTERNAL, "a binary (-bin) header is not valid base64")
            return
        call = NativeCall(self, event.stream_id, metadata)
        self.calls[event.stream_id] = call
        call.task = task = asyncio.get_running_loop().create_task(
            self._run(call, handler, event.timeout), name=f"grpc-call {event.path} {self.peer}"
        )
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _run(self, call: NativeCall, handler: Handler, timeout: float | None) -> None:
        status: int | None = h2_core.OK
        message = ""
        try:
            if timeout is None:
                await handler(None, call)
            else:
                async with asyncio.timeout(timeout) as deadline:
                    await handler(None, call)
        except _Aborted:
            status = None  # abort() queued the status
        except TimeoutError:
            if timeout is None or not deadline.expired():
                log.exception("%s call failed peer=%s", self.server.name, self.peer)
                status, message = h2_core.UNKNOWN, "Unexpected error in the proxy-server"
            else:
                status, message = h2_core.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except asyncio.CancelledError:
            status = None  # the call or the connection is gone, or the server is stopping
            self.core.reset(call.stream_id)
        except Exception:
            log.exception("%s call failed peer=%s", self.server.name, self.peer)
            status, message = h2_core.UNKNOWN, "Unexpected error in the proxy-server"
        finally:
            call._end()
            self.calls.pop(call.stream_id, None)
            call.task = None
        if status is not None:
            self.core.end_call(call.stream_id, status, message)
        self.check_input()  # the call's unread input is gone with it
        self.flush_soon()
        self._close_if_done()

    def end_call(self, call: NativeCall, status: int, message: str) -> None:
        self.core.end_call(call.stream_id, status, message)
        self.flush_soon()

    def _cancel_call(self, stream_id: int, reason: str) -> None:
        call = self.calls.pop(stream_id, None)
        if call is not None:
            log.debug("%s call ended by the client peer=%s reason=%s", self.server.name, self.peer, reason)
            call._end()
            if call.task is not None:
                call.task.cancel()

    def _abort_calls(self) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call._end()
            if call.task is not None:
                call.task.cancel()

    def goaway(self) -> None:
        """The server is stopping: no new calls; the connection closes when its calls end."""
        self._closing = True
        self.core.goaway()
        self._flush()
        self._close_if_done()

    # -- output --------------------------------------------------------------------------

    def flush_soon(self) -> None:
        """Write what the core queued, once this loop turn is over (batches a turn's writes)."""
        if self._flush_handle is None and not self._lost:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        out = self.core.data_to_send()
        if out and self.transport is not None and not self._lost:
            self.transport.writelines(out)

    def _close_if_done(self) -> None:
        """After GOAWAY: close once every call has ended and its last bytes are queued."""
        if self._closing and not self.calls and not self.core.calls and self.transport is not None and not self._lost:
            self._flush()
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = asyncio.get_running_loop().call_later(CLOSE_SECONDS, self.abort)

    def _handshake_expired(self) -> None:
        self._deadline = None
        log.warning("%s connection sent no HTTP/2 preface and SETTINGS in %.0fs, closing peer=%s",
                    self.server.name, HANDSHAKE_SECONDS, self.peer)
        self.abort()

    def abort(self) -> None:
        """Drop the connection now (the server's grace is over)."""
        self._abort_calls()
        if self.transport is not None:
            self.transport.abort()

    # -- keepalive -----------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._lost or not self.server.keepalive_time:
            self._keepalive = None
            return
        self._keepalive = asyncio.get_running_loop().call_later(self.server.keepalive_time, self._ping)

    def _ping(self) -> None:
        self.core.ping()
        self._flush()
        self._keepalive = asyncio.get_running_loop().call_later(KEEPALIVE_TIMEOUT_SECONDS, self._ping_lost)

    def _ping_lost(self) -> None:
        self._keepalive = None
        log.warning("%s connection did not answer a keepalive ping, closing peer=%s", self.server.name, self.peer)
        self.abort()


def _peer_name(transport: asyncio.BaseTransport) -> str:
    """As grpc names peers: unix:PATH, ipv4:HOST:PORT, ipv6:[HOST]:PORT."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        return "unix:" + (transport.get_extra_info("sockname") or "")
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return "unknown"


class NativeGrpcServer:
    """Listeners for streaming gRPC calls; `stop` ends them like grpc.aio's server.stop."""

    def __init__(
        self, handlers: Mapping[str, Handler], *, max_message_bytes: int, keepalive_time: float = 0.0, name: str = "grpc"
    ) -> None:
        self.name = name  # in log lines: "frontend", "agent port"
        self.handlers = dict(handlers)
        self.max_message_bytes = max_message_bytes
        self.keepalive_time = keepalive_time
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # every call's handler, until it ends
        self.stopping = False
        self._listeners: list[asyncio.Server] = []
        self._all_closed: asyncio.Event | None = None

    async def listen_unix(self, sock: socket.socket) -> None:
        """Serve on a bound Unix socket (the caller bound it with the mode it wants)."""
        loop = asyncio.get_running_loop()
        self._listeners.append(await loop.create_unix_server(lambda: _Connection(self), sock=sock, backlog=4096))

    async def listen_tcp(self, host: str, port: int, tls: ssl.SSLContext) -> int:
        """Serve TLS on `host`:`port` (0: any free port, returned); `tls` must offer ALPN h2."""
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(lambda: _Connection(self), host or None, port, ssl=tls, backlog=4096)
        self._listeners.append(listener)
        return int(listener.sockets[0].getsockname()[1])

    def connection_closed(self) -> None:
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting; tell every client (GOAWAY); give calls `grace` seconds to end,
        then cancel them and close every connection."""
        self.stopping = True
        for listener in self._listeners:
            listener.close()
        self._all_closed = asyncio.Event()
        for connection in list(self.connections):
            connection.goaway()
        if self.connections and grace:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
        for connection in list(self.connections):
            connection.abort()
        if self.connections:  # abort() reports connection_lost on the next loop turn
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._all_closed.wait()
        if self.tasks:  # cancelled by abort() or earlier: wait for their cleanup (a handler's finally is short)
            await asyncio.wait(set(self.tasks), timeout=10.0)
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
