"""One Connect stream to one proxy server, and the endpoint connections it carries.

SHELL. One reader task feeds the connection table; one writer task drains the stream's
mailbox; each endpoint connection is one task (dial, then two pumps) owned by the
session's TaskGroup, so nothing outlives the session.

Ordering: the DIAL_RSP of a connection is queued before any of its DATA, and its CLOSE_RSP
after all of it, because every message for the server goes through the one FIFO mailbox.

Own streams on demand (flow control negotiated, `flow_upgrade_bytes` > 0): a connection
starts here like in plain mode; once it has carried `flow_upgrade_bytes` (read from the
endpoint plus received for it) its up pump stops at a packet boundary (woken from its read
if the bytes came from the server) and `flow.continue_on_own_stream` carries the rest.

Backpressure: endpoint readers await room in the stream's mailbox (the server's reading
pace limits how fast we read endpoints). DATA from the server waits at most
`overflow_wait` for room in that connection's inbox; past that only that connection is
closed, so a stalled endpoint cannot hold the stream's reader for longer. A connection
moving onto its own stream never waits here: what still reaches it on the shared stream is
what the server queued before it read our marker, and is queued past the inbox's cap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc.aio

from proxy_agent import connections as c
from proxy_agent.config import AgentConfig
from proxy_agent.dialer import open_tcp
from proxy_agent.flow import continue_on_own_stream, serve_on_own_stream
from proxy_agent.metrics import AgentMetrics
from proxy_common.errors import DialError, MalformedPacket, TunnelBroken, TunnelClosed
from proxy_common.mailbox import Mailbox, MailboxClosed
from proxy_common.messages import Data, Drain, Message, packet_type_name
from proxy_common.metrics import go_code_name
from proxy_common.streams import PacketStream, next_outgoing
from proxy_common.tasks import race

log = logging.getLogger("proxy_agent.session")

CLOSE_FLUSH_SECONDS = 5.0


def message_size(message: Message) -> int:
    return len(message.data) if type(message) is Data else 0


@dataclass(slots=True)
class _Endpoint:
    conn_id: int
    inbox: Mailbox[bytes]
    task: asyncio.Task[None] | None = None
    deadline: asyncio.Timeout | None = None
    opened: float = field(default_factory=time.monotonic)
    address: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    close_reason: str = ""
    # Own stream on demand: bytes counted toward the threshold, and the up pump's hand-over.
    carried: int = 0
    up_task: asyncio.Task[None] | None = None
    up_reading: bool = False
    woken: bool = False
    switching: bool = False
    pending_up: bytes | None = None
    own_stream: bool = False
    reading_own_stream: bool = False  # a task waits in a read on the connection's own stream


class Session:
    def __init__(
        self,
        stream: PacketStream,
        config: AgentConfig,
        metrics: AgentMetrics,
        *,
        server_id: str,
        channel: grpc.aio.Channel | None = None,
        flow_token: str | None = None,
    ) -> None:
        self.stream = stream
        self.config = config
        self.metrics = metrics
        self.server_id = server_id
        # Per-connection streams (proto/flow.proto) when the server offered them.
        self.channel = channel
        self.flow_token = flow_token
        self.upgrade_bytes = config.flow_upgrade_bytes if flow_token is not None else 0
        self.table = c.ConnectionTable()
        self.outbox: Mailbox[Message] = Mailbox(config.endpoint_buffer_bytes, message_size)
        self.endpoints: dict[int, _Endpoint] = {}
        self._group: asyncio.TaskGroup | None = None
        self.draining = False

    def __repr__(self) -> str:
        return f"Session(server_id={self.server_id}, connections={len(self.endpoints)})"

    async def run(self) -> None:
        """Serve the stream until it ends; every endpoint connection is closed on the way out."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                try:
                    await race(
                        self._read_loop(),
                        self._write_loop(),
                        names=(f"agent-reader server_id={self.server_id}", f"agent-writer server_id={self.server_id}"),
                    )
                finally:
                    self._lose_tunnel()
        except* (TunnelClosed, TunnelBroken) as group:
            log.info("server stream ended server_id=%s reason=%s", self.server_id, group.exceptions[0])
        except* MalformedPacket as group:
            log.warning("malformed packet from server server_id=%s error=%s", self.server_id, group.exceptions[0])
        finally:
            self._group = None

    def buffered_bytes(self) -> int:
        return self.outbox.buffered_bytes + sum(e.inbox.buffered_bytes for e in self.endpoints.values())

    def send_drain(self) -> None:
        """Tell the server to avoid this agent for new dials (first SIGTERM)."""
        if not self.draining:
            self.draining = True
            self.table.drain()
            self._send(Drain())

    # --------------------------------------------------------------- stream loops
    async def _read_loop(self) -> None:
        while True:
            try:
                message = await self.stream.receive()
            except TunnelBroken as exc:
                self.metrics.stream_failed("to_agent", go_code_name(exc.code))
                raise
            except MalformedPacket:
                self.metrics.stream_failed("to_agent", "Internal")  # Go: Recv fails to unmarshal
                raise
            self.metrics.packet("to_agent", message)
            for action in self.table.receive(message):
                await self._carry_out(action)

    async def _write_loop(self) -> None:
        while (message := await next_outgoing(self.outbox)) is not None:
            try:
                await self.stream.send(message)
            except TunnelBroken as exc:
                self.metrics.stream_failed("from_agent", go_code_name(exc.code), packet_type_name(message))
                raise
            self.metrics.packet("from_agent", message)

    # ---------------------------------------------------------------- actions
    async def _carry_out(self, action: c.Action) -> None:
        if type(action) is c.WriteEndpoint:
            await self._write_endpoint(action)
            return
        match action:
            case c.StartDial():
                self._start_connection(action)
            case c.CloseEndpoint(conn_id=conn_id):
                self._close_endpoint(conn_id)
            case c.CancelDial(conn_id=conn_id):
                endpoint = self.endpoints.get(conn_id)
                if endpoint is not None and endpoint.task is not None:
                    endpoint.task.cancel()
            case c.Send(message=message):
                self._send(message)
            case c.SwitchDown(conn_id=conn_id):
                endpoint = self.endpoints.get(conn_id)
                if endpoint is not None:
                    endpoint.inbox.force(b"")  # the end of what the shared stream carries for it
            case c.Discard(message=message, reason=reason):
                log.debug("packet ignored message=%r reason=%s", message, reason)
            case c.DialRefused(dial_id=dial_id, address=address):
                self.metrics.refused_dials.inc()
                log.info("dial refused while draining dial_id=%d address=%s server_id=%s", dial_id, address, self.server_id)
            case _:
                raise AssertionError(f"unhandled action {action!r}")

    def _apply(self, actions: list[c.Action]) -> None:
        """Carry out actions that never wait (from connection tasks)."""
        for action in actions:
            match action:
                case c.Send(message=message):
                    self._send(message)
                case c.CloseEndpoint(conn_id=conn_id):
                    self._close_endpoint(conn_id)
                case c.SendOwn(message=message):
                    log.debug("own stream gone, not sent message=%r", message)
                case _:
                    raise AssertionError(f"unexpected action {action!r}")

    def _send(self, message: Message) -> None:
        self.outbox.force(message)

    async def _write_endpoint(self, action: c.WriteEndpoint) -> None:
        endpoint = self.endpoints.get(action.conn_id)
        if endpoint is None:
            return
        if self.upgrade_bytes:
            if endpoint.own_stream:
                # Moving onto its own stream: what still comes here is bounded by what the server
                # queued before it met our marker, so it never holds up the shared stream.
                endpoint.inbox.force(action.data)
                return
            endpoint.carried += len(action.data)
            if endpoint.up_reading and not endpoint.woken and endpoint.carried >= self.upgrade_bytes:
                endpoint.woken = True  # the up pump waits in a read: let it switch now
                assert endpoint.up_task is not None
                endpoint.up_task.cancel()
        try:
            if await endpoint.inbox.put_within(action.data, self.config.overflow_wait):
                return
        except MailboxClosed:
            return
        log.warning("endpoint stopped reading, closing it conn_id=%d address=%s", action.conn_id, endpoint.address)
        self.metrics.overflow_closes.inc()
        endpoint.close_reason = "overflow"
        self._apply(self.table.inbox_overflowed(action.conn_id))

    def _close_endpoint(self, conn_id: int) -> None:
        """Flush what is queued for the endpoint, then close it, within a bounded time."""
        endpoint = self.endpoints.get(conn_id)
        if endpoint is None:
            return
        endpoint.close_reason = endpoint.close_reason or "close_request"
        endpoint.inbox.close()
        if endpoint.deadline is not None:  # set only while its block runs (cleared on the way out)
            endpoint.deadline.reschedule(asyncio.get_running_loop().time() + CLOSE_FLUSH_SECONDS)

    def _lose_tunnel(self) -> None:
        self.table.tunnel_lost()
        self.outbox.close()
        for endpoint in self.endpoints.values():
            endpoint.close_reason = endpoint.close_reason or "tunnel_lost"
            if endpoint.task is not None:
                endpoint.task.cancel()

    # ----------------------------------------------------------- connections
    def _start_connection(self, dial: c.StartDial) -> None:
        assert self._group is not None
        endpoint = _Endpoint(dial.conn_id, Mailbox(self.config.endpoint_buffer_bytes, len), address=dial.address)
        self.endpoints[dial.conn_id] = endpoint
        endpoint.task = self._group.create_task(
            self._connection(endpoint, dial), name=f"endpoint conn_id={dial.conn_id} server_id={self.server_id}"
        )

    async def _connection(self, endpoint: _Endpoint, dial: c.StartDial) -> None:
        try:
            started = time.monotonic()
            try:
                reader, writer = await open_tcp(
                    dial.protocol, dial.address, timeout=self.config.dial_timeout, limit=self.config.read_chunk_bytes
                )
            except DialError as exc:
                reason = "timeout" if exc.timed_out else "unknown"
                self.metrics.endpoint_dial_failures.labels(reason).inc()
                log.info("dial failed dial_id=%d address=%s error=%s", dial.dial_id, dial.address, exc)
                self._apply(self.table.dial_failed(dial.conn_id, str(exc)))
                return
            self.metrics.dial_duration.observe(time.monotonic() - started)
            await self._serve_endpoint(endpoint, reader, writer)
        except Exception:  # one connection's failure must never end the session's TaskGroup
            log.exception("endpoint connection failed conn_id=%d address=%s", dial.conn_id, dial.address)
        finally:
            del self.endpoints[dial.conn_id]

    async def _serve_endpoint(
        self, endpoint: _Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn_id = endpoint.conn_id
        connected = time.monotonic()
        self.metrics.open_endpoint_connections.inc()
        log.debug("endpoint connected conn_id=%d address=%s", conn_id, endpoint.address)
        try:
            if self.flow_token is not None and not self.upgrade_bytes:
                endpoint.own_stream = True
                await serve_on_own_stream(self, endpoint, reader, writer)
                return
            self._apply(self.table.dial_succeeded(conn_id))
            async with asyncio.timeout(None) as deadline:
                endpoint.deadline = deadline
                if endpoint.inbox.closed:  # a close arrived while we dialed
                    deadline.reschedule(asyncio.get_running_loop().time() + CLOSE_FLUSH_SECONDS)
                await race(self._endpoint_to_server(endpoint, reader), self._server_to_endpoint(endpoint, writer))
                endpoint.deadline = None
            if endpoint.switching:
                await continue_on_own_stream(self, endpoint, reader, writer)
        except* TimeoutError:  # the bounded flush after a close ran out
            log.debug("endpoint connection ended conn_id=%d reason=flush timeout", conn_id)
        except* OSError as group:
            endpoint.close_reason = endpoint.close_reason or "error"
            log.debug("endpoint connection ended conn_id=%d reason=%r", conn_id, group.exceptions[0])
        finally:
            endpoint.deadline = None
            writer.transport.abort()
            self.metrics.open_endpoint_connections.dec()
            reason = endpoint.close_reason or "endpoint_closed"
            self.metrics.endpoint_closed(time.monotonic() - connected, reason, endpoint.bytes_in, endpoint.bytes_out)
            self._apply(self.table.endpoint_closed(conn_id))
            log.debug("endpoint closed conn_id=%d reason=%s in=%d out=%d", conn_id, reason, endpoint.bytes_in, endpoint.bytes_out)

    async def _endpoint_to_server(self, endpoint: _Endpoint, reader: asyncio.StreamReader) -> None:
        if self.upgrade_bytes:
            await self._endpoint_to_server_until_upgrade(endpoint, reader)
            return
        chunk_size, conn_id = self.config.read_chunk_bytes, endpoint.conn_id
        put = self.outbox.put
        try:
            while chunk := await reader.read(chunk_size):
                endpoint.bytes_out += len(chunk)
                await put(Data(conn_id, chunk))
        except MailboxClosed:
            return
        except OSError as exc:  # reset by the endpoint: this connection ends, nothing else
            endpoint.close_reason = endpoint.close_reason or "error"
            log.debug("endpoint read failed conn_id=%d error=%r", conn_id, exc)

    async def _endpoint_to_server_until_upgrade(self, endpoint: _Endpoint, reader: asyncio.StreamReader) -> None:
        """The up pump while the connection may still move onto its own stream. It returns with
        `endpoint.switching` set once the threshold is reached, at a point where every packet it
        read is queued on the shared stream except `pending_up` (which goes on the own stream)."""
        chunk_size, conn_id, threshold = self.config.read_chunk_bytes, endpoint.conn_id, self.upgrade_bytes
        task = endpoint.up_task = asyncio.current_task()
        assert task is not None
        try:
            while endpoint.carried < threshold or endpoint.inbox.closed:
                endpoint.up_reading = True
                try:
                    chunk = await reader.read(chunk_size)  # cancelling a read loses no bytes
                except asyncio.CancelledError:
                    if not endpoint.woken or task.uncancel() > 0:
                        raise
                    endpoint.woken = False
                    continue
                finally:
                    endpoint.up_reading = False
                if not chunk:
                    return
                endpoint.bytes_out += len(chunk)
                endpoint.carried += len(chunk)
                if endpoint.carried >= threshold and not endpoint.inbox.closed:
                    endpoint.pending_up = chunk
                    break
                try:
                    await self.outbox.put(Data(conn_id, chunk))
                except MailboxClosed:
                    return
            endpoint.switching = True
        finally:
            endpoint.up_task = None

    async def _server_to_endpoint(self, endpoint: _Endpoint, writer: asyncio.StreamWriter) -> None:
        inbox = endpoint.inbox
        try:
            while (chunk := await inbox.get()) is not None:
                endpoint.bytes_in += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except OSError as exc:
            endpoint.close_reason = endpoint.close_reason or "error"
            log.debug("endpoint write failed conn_id=%d error=%r", endpoint.conn_id, exc)
