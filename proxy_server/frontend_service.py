"""ProxyService.Proxy: one konnectivity-client stream, one dial.

SHELL. The RPC's own task reads: it hands every packet to the switchboard (and waits only
when the agent stream is full). Writing runs in a task of its own, started when the
frontend's mailbox gets something and retired once the stream has been idle for
IDLE_WRITER_SECONDS: a dial's few packets cost one task, and a held, idle tunnel costs no
task, no waiter and no suspended coroutines besides the pending read (a control plane holds
thousands). Nothing is tied to the HTTP/2 connection: a reusable-tunnel client may run many
of these streams on one connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import grpc

from proxy_common.errors import MalformedPacket, TunnelClosed
from proxy_common.messages import Message
from proxy_common.streams import ServerStream, next_outgoing, split_data
from proxy_common.tasks import cancel_and_wait
from proxy_server.grpc_native import CallGone, NativeCall
from proxy_server.switchboard import Link, Switchboard

# After everything is written the server leaves ending the stream to the client, as the Go
# server does; unlike the reference, a client that never does is released after this.
LINGER_SECONDS = 60.0

# A writer with nothing to write for this long (at most twice this) ends; the next packet
# for the client starts a new one. Short enough that a burst of new tunnels never holds
# thousands of writers at once (their memory would stay in the process's RSS), long enough
# that one dial's packets, a round trip apart, share one writer.
IDLE_WRITER_SECONDS = 0.5


class _Retire:
    """Queued behind everything else to tell an idle writer to end (never written)."""


RETIRE = cast(Message, _Retire())

log = logging.getLogger("proxy_server.frontend")


class ProxyServicer:
    def __init__(self, board: Switchboard, *, max_data_bytes: int = 256 << 10) -> None:
        self.board = board
        # DATA toward clients is cut to this size (--frontend-data-bytes): see split_data.
        self.max_data_bytes = max_data_bytes
        self._writing: set[_Frontend] = set()  # frontends whose writer task runs
        self._sweep: asyncio.TimerHandle | None = None  # armed while some writer runs
        self._closed = False

    def close(self) -> None:
        """The server is stopping: no sweep runs after this."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def writer_started(self, frontend: _Frontend) -> None:
        self._writing.add(frontend)
        self._arm_sweep()

    def writer_stopped(self, frontend: _Frontend) -> None:
        self._writing.discard(frontend)

    def _retire_idle_writers(self) -> None:
        """Ask every writer that wrote nothing since the last sweep, and has nothing queued, to
        end. The request is queued behind everything else, so nothing is ever cut short."""
        self._sweep = None
        for frontend in self._writing:
            mailbox = frontend.link.mailbox
            if not frontend.wrote and not len(mailbox) and not mailbox.closed:
                mailbox.force(RETIRE)
            frontend.wrote = False
        self._arm_sweep()

    def _arm_sweep(self) -> None:
        if self._sweep is None and self._writing and not self._closed:
            self._sweep = asyncio.get_running_loop().call_later(IDLE_WRITER_SECONDS, self._retire_idle_writers)

    async def proxy(self, _requests: Any, context: NativeCall) -> None:
        board = self.board
        metrics = board.metrics
        frontend_id, link = board.open_frontend(f"proxy-stream peer={context.peer()}")
        metrics.grpc_connections.labels("Proxy").inc()
        frontend = _Frontend(self, ServerStream(context), link)
        link.mailbox.when_unattended = frontend.start_writer
        try:
            async with asyncio.timeout(None) as deadline:
                frontend.deadline = deadline
                while True:
                    try:
                        message = await frontend.stream.receive()
                    except TunnelClosed:
                        break
                    await board.from_frontend(frontend_id, message, service_method="Proxy")
                    del message  # an idle tunnel must not keep its last packet (and buffer) alive
        except TimeoutError:
            if not deadline.expired():
                raise  # not ours
            # The writer ended the stream: the client went away or lingered too long, or a bug.
            if frontend.failure:
                await frontend.stop()
                await context.abort(grpc.StatusCode.INTERNAL, frontend.failure)
        except MalformedPacket as exc:
            await frontend.stop()
            metrics.undecodable_packet("from_client")
            log.warning("malformed packet from frontend, ending stream error=%s", exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            try:
                await frontend.stop()  # raises CancelledError again if the RPC was cancelled meanwhile
            finally:
                link.mailbox.when_unattended = None  # no cycle through the hook: freed at once
                board.close_frontend(frontend_id)
                metrics.grpc_connections.labels("Proxy").dec()


class _Frontend:
    """One Proxy stream's sending side: the writer task while there is something to write,
    and the deadline of the RPC's reading, which the writer sets when the stream is done."""

    __slots__ = ("deadline", "ended", "failure", "link", "servicer", "stream", "writer", "wrote")

    def __init__(self, servicer: ProxyServicer, stream: ServerStream, link: Link) -> None:
        self.servicer = servicer
        self.stream = stream
        self.link = link
        self.writer: asyncio.Task[None] | None = None
        self.deadline: asyncio.Timeout | None = None
        self.ended = False
        self.wrote = False  # since the last sweep
        self.failure = ""  # set when the writer failed unexpectedly

    def start_writer(self) -> None:
        """The mailbox got something (or closed) while no writer runs."""
        if self.writer is None and not self.ended:
            self.writer = asyncio.create_task(self._write(), name=f"frontend-writer {self.link.label}")
            self.servicer.writer_started(self)

    async def stop(self) -> None:
        self.ended = True
        self.deadline = None
        writer = self.writer
        if writer is not None:
            try:
                await cancel_and_wait(writer)
            finally:
                # A writer cancelled before its first step never runs its own finally.
                self.writer = None
                self.servicer.writer_stopped(self)

    def _end_reading(self, seconds: float) -> None:
        deadline = self.deadline
        if deadline is not None and not deadline.expired():
            deadline.reschedule(asyncio.get_running_loop().time() + seconds)

    async def _write(self) -> None:
        mailbox = self.link.mailbox
        metrics = self.servicer.board.metrics
        observe = metrics.frontend_write_duration.observe
        limit = self.servicer.max_data_bytes
        try:
            while True:
                queued = await next_outgoing(mailbox, limit)
                if queued is RETIRE:
                    if len(mailbox) or mailbox.closed:
                        continue  # something came after the request: keep going
                    return  # idle: whatever comes next starts a new writer
                if queued is None:
                    # Everything is written. As the Go server does, leave ending the stream to
                    # the client: ending the RPC now would make grpc reset the stream under a
                    # client that is still sending, and a grpc.aio client then fails its call
                    # and loses what it has not read yet. Its reading ends when the client ends
                    # its side; a client that never does is released after LINGER_SECONDS.
                    self._end_reading(LINGER_SECONDS)
                    return
                self.wrote = True
                for message in split_data(queued, limit):
                    started = time.perf_counter()
                    try:
                        await self.stream.send(message)
                    except CallGone:  # the client went away while we wrote
                        metrics.send_failed("to_client", message)
                        self.ended = True  # no new writer for a stream whose client is gone
                        self._end_reading(0)
                        return
                    observe(time.perf_counter() - started)
                    metrics.packet("to_client", message)
        except Exception:  # a bug here must end this stream, not go unnoticed
            log.exception("frontend writer failed, ending stream stream=%s", self.link.label)
            self.ended = True
            self.failure = "proxy-server failed to write to this stream"
            self._end_reading(0)
        finally:
            self.writer = None
            self.servicer.writer_stopped(self)
