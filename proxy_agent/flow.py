"""One endpoint connection on its own gRPC stream (per-connection flow control).

SHELL. Used when the server offered it on the Connect stream (see proto/flow.proto). The
stream is opened on the same channel, so it reaches the same server over the same HTTP/2
connection. Its first packet is the connection's DIAL_RSP; then DATA goes both ways and the
connection ends with CLOSE_RSP, all in order on this one stream. Both directions are plain
awaits: a read from the endpoint waits for this stream's HTTP/2 window, and a write to the
endpoint waits for the socket to drain, so a stalled reader at either end stops only this
connection, and nothing is buffered beyond the socket and HTTP/2 windows.

With `--flow-upgrade-bytes` above 0 a connection starts on the shared Connect stream and is
moved here once it has carried that many bytes (`continue_on_own_stream`). Order across the
switch: the own stream's first packet is an `OwnStream` marker, and the same marker is
queued on the shared stream after every packet of the connection already queued there;
the server reads nothing from the own stream before it met that marker, and answers with
its own marker on the shared stream, after which it sends the connection's packets only
on the own stream. Toward the endpoint we first write out what the shared stream brought
(the endpoint's inbox, up to the server's marker), then what the own stream brings.

A pending grpc.aio read must never be cancelled while the stream is still wanted (that
cancels the RPC), so the task reading the stream is only cancelled once we are done with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import grpc.aio

from proxy_agent import connections as c
from proxy_common import metadata
from proxy_common.errors import MalformedPacket, TunnelBroken, TunnelClosed
from proxy_common.messages import Data, Message, OwnStream, packet_type_name
from proxy_common.metrics import go_code_name
from proxy_common.streams import ClientStream
from proxy_common.tasks import cancel_and_wait

if TYPE_CHECKING:
    from proxy_agent.session import Session, _Endpoint

FLOW_METHOD = "/konnectivity_py.flow.v1.ConnectionService/Stream"
STREAM_ERRORS = (TunnelClosed, TunnelBroken, MalformedPacket, ConnectionError, OSError)
# After CLOSE_RSP the server ends the stream once its client has read everything before it;
# only this connection's stream waits meanwhile, so a slow client keeps every byte. Losing
# the session (or the agent stopping) cancels the wait sooner.
GOODBYE_SECONDS = 3600.0
# How the reader task may end once the endpoint is closed: a packet for the endpoint meets
# its aborted socket (uvloop refuses the write, asyncio's drain fails), or an answer meets
# the stream we already half-closed. The goodbye then reads to the stream's end itself.
GOODBYE_READER_ERRORS = (*STREAM_ERRORS, RuntimeError, asyncio.InvalidStateError, grpc.aio.UsageError)
CLOSE_FLUSH_SECONDS = 5.0


async def serve_on_own_stream(
    session: Session, endpoint: _Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Carry one open endpoint connection on its own stream until either side closes."""
    assert session.channel is not None and session.flow_token is not None
    conn_id = endpoint.conn_id
    call = session.channel.stream_stream(FLOW_METHOD)(metadata=((metadata.SESSION, session.flow_token),))
    stream = ClientStream(call)
    opened = session.table.dial_succeeded(conn_id)
    first = [action.message for action in opened if isinstance(action, c.Send)]
    cancelled = len(first) != len(opened)  # the dial was cancelled meanwhile
    await _carry(session, endpoint, stream, reader, writer, None if cancelled else first,
                 lambda: _down(session, endpoint, stream, writer))


async def continue_on_own_stream(
    session: Session, endpoint: _Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Move an open connection from the shared stream onto its own stream and carry it there.

    The caller's up pump has stopped: every packet it read is queued on the shared stream,
    except `endpoint.pending_up`, which goes first on the own stream."""
    assert session.channel is not None and session.flow_token is not None
    conn_id = endpoint.conn_id
    marker = session.table.own_stream_started(conn_id)
    if not marker:
        return  # no longer open
    call = session.channel.stream_stream(FLOW_METHOD)(metadata=((metadata.SESSION, session.flow_token),))
    stream = ClientStream(call)
    for action in marker:
        assert isinstance(action, c.Send)
        session.outbox.force(action.message)  # after every packet of it queued on the shared stream
    endpoint.own_stream = True
    session.metrics.own_stream_upgrades.inc()
    first: list[Message] = [OwnStream(conn_id)]
    if endpoint.pending_up:
        first.append(Data(conn_id, endpoint.pending_up))
        endpoint.pending_up = None
    await _carry(session, endpoint, stream, reader, writer, first,
                 lambda: _down_after_switch(session, endpoint, stream, writer))


async def _carry(
    session: Session, endpoint: _Endpoint, stream: ClientStream, reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter, first: list[Message] | None, down: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Send `first` on the connection's own stream, then pump both ways until either side
    ends; always close the endpoint and say goodbye on the stream. `first` None: the
    connection is already over (nothing is sent)."""
    down_task: asyncio.Task[None] | None = None
    try:
        if first is None:
            return
        for message in first:
            await _send(session, stream, message)
        down_task = asyncio.create_task(down(), name=f"conn-stream-reader conn_id={endpoint.conn_id}")
        await _up_until_either_ends(session, endpoint, stream, reader, down_task)
    except STREAM_ERRORS:
        pass
    finally:
        writer.transport.abort()
        await _say_goodbye(session, endpoint, stream, down_task)


async def _down_after_switch(
    session: Session, endpoint: _Endpoint, stream: ClientStream, writer: asyncio.StreamWriter
) -> None:
    """Write out what the shared stream brought until the server's marker, then read this stream.
    The inbox ends early (closed) when a close request or an overflow came on the shared stream."""
    inbox = endpoint.inbox
    async with asyncio.timeout(None) as deadline:
        endpoint.deadline = deadline  # a close request bounds the flush, as in plain mode
        try:
            if inbox.closed:
                deadline.reschedule(asyncio.get_running_loop().time() + CLOSE_FLUSH_SECONDS)
            while (chunk := await inbox.get()) is not None:
                if not chunk:
                    break  # the server's marker: the rest comes on the own stream
                endpoint.bytes_in += len(chunk)
                writer.write(chunk)
                await writer.drain()
            else:
                return
        finally:
            endpoint.deadline = None  # however the block ends: a later close must not touch it
    await _down(session, endpoint, stream, writer)


async def _up_until_either_ends(
    session: Session, endpoint: _Endpoint, stream: ClientStream, reader: asyncio.StreamReader, down_task: asyncio.Task[None]
) -> None:
    """Copy endpoint bytes to the stream until the endpoint's EOF or the reader task ends.

    When the reader task ends first (a close request), a read from the endpoint is simply
    cancelled, but a write already under way is let finish: cancelling a grpc.aio write
    cancels the whole call, and the CLOSE_RSP that follows would be lost (while the server
    still waits for this stream to claim the connection, the frontend would wait for it)."""
    chunk_size = session.config.read_chunk_bytes
    writing = False
    stopping = False

    async def up() -> None:
        nonlocal writing
        while not stopping and (chunk := await reader.read(chunk_size)):
            endpoint.bytes_out += len(chunk)
            writing = True
            try:
                await _send(session, stream, Data(endpoint.conn_id, chunk))
            finally:
                writing = False

    up_task = asyncio.create_task(up(), name=f"conn-stream-writer conn_id={endpoint.conn_id}")
    try:
        await asyncio.wait((down_task, up_task), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await cancel_and_wait(up_task, STREAM_ERRORS)  # the agent is stopping: a write under way goes too
        raise
    if up_task.done():
        up_task.result()
        return
    # The reader task ended first (a close request): stop reading the endpoint, but give a
    # write under way a bounded time to finish so that the call, and the CLOSE_RSP after it,
    # survive.
    stopping = True
    if not writing:
        up_task.cancel()  # it waits on the socket: safe to cancel
    try:
        async with asyncio.timeout(CLOSE_FLUSH_SECONDS):
            await asyncio.wait((up_task,))
    except TimeoutError:
        pass
    finally:
        if not up_task.done():  # out of time, or we are cancelled: the write goes too
            await cancel_and_wait(up_task, STREAM_ERRORS)
    error = None if up_task.cancelled() else up_task.exception()
    if error is not None and not isinstance(error, STREAM_ERRORS):
        raise error


async def _down(session: Session, endpoint: _Endpoint, stream: ClientStream, writer: asyncio.StreamWriter) -> None:
    """Apply what the server sends on this stream until CLOSE_REQ or the end of the stream."""
    endpoint.reading_own_stream = True
    while True:
        try:
            message = await stream.receive()
        except TunnelClosed:
            return
        except TunnelBroken as exc:
            session.metrics.stream_failed("to_agent", go_code_name(exc.code))
            raise
        except MalformedPacket:
            session.metrics.stream_failed("to_agent", "Internal")
            raise
        session.metrics.packet("to_agent", message)
        for action in session.table.receive(message):
            if type(action) is c.WriteEndpoint:
                endpoint.bytes_in += len(action.data)
                writer.write(action.data)
                await writer.drain()
            elif type(action) is c.CloseEndpoint:
                endpoint.close_reason = endpoint.close_reason or "close_request"
                return
            elif type(action) is c.Send:
                await _send(session, stream, action.message)


async def _send(session: Session, stream: ClientStream, message: Message) -> None:
    """Send on this connection's stream, counted like the shared stream's packets and errors."""
    try:
        await stream.send(message)
    except TunnelBroken as exc:
        session.metrics.stream_failed("from_agent", go_code_name(exc.code), packet_type_name(message))
        raise
    session.metrics.packet("from_agent", message)


async def _say_goodbye(session: Session, endpoint: _Endpoint, stream: ClientStream, down_task: asyncio.Task[None] | None) -> None:
    """CLOSE_RSP after all DATA, half-close, then let the server end the stream (bounded).

    Cancelling the call earlier could make the server drop DATA it has not read yet. Who
    watches for that end: the reader task if it already reads the stream (cancelling its
    read would cancel the call); otherwise we do, and the reader task, still waiting for the
    server's marker on the shared stream (which may come after the end, or never), goes."""
    call = stream.call
    try:
        if down_task is not None and not endpoint.reading_own_stream:
            down_task.cancel()  # it waits on the endpoint's inbox or socket: nothing is lost
            await asyncio.wait((down_task,))
        with contextlib.suppress(*STREAM_ERRORS, TimeoutError, grpc.aio.UsageError, asyncio.InvalidStateError):
            async with asyncio.timeout(GOODBYE_SECONDS):
                for action in session.table.endpoint_closed(endpoint.conn_id):
                    if isinstance(action, (c.Send, c.SendOwn)):
                        await _send(session, stream, action.message)
                await call.done_writing()
                if down_task is not None and not down_task.done():
                    await asyncio.wait((down_task,))  # it may also end early: see below
                with contextlib.suppress(TunnelClosed):
                    while True:  # nobody else reads now: wait for the server's end of stream
                        await stream.receive()
    finally:  # even when we are cancelled meanwhile: the call and its reader never outlive us
        call.cancel()
        if down_task is not None:
            await cancel_and_wait(down_task, GOODBYE_READER_ERRORS)
