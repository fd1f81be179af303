"""ProxyService.Proxy: one konnectivity-client stream, one dial.

SHELL. One reader task and one writer task per stream. The reader hands every packet to
the switchboard (and waits only when the agent stream is full); the writer drains the
frontend's mailbox into the stream and ends it once the router says the tunnel is over.
Nothing is tied to the HTTP/2 connection: a reusable-tunnel client may run many of these
streams on one connection at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import grpc
import grpc.aio

from proxy_common.errors import MalformedPacket
from proxy_common.streams import ServerStream, next_outgoing, split_data
from proxy_common.tasks import first_error, race
from proxy_server.stream_loops import read_into
from proxy_server.switchboard import Link, Switchboard

LINGER_SECONDS = 60.0

log = logging.getLogger("proxy_server.frontend")


class ProxyServicer:
    def __init__(self, board: Switchboard, *, max_data_bytes: int = 256 << 10) -> None:
        self.board = board
        # DATA toward clients is cut to this size (--frontend-data-bytes): see split_data.
        self.max_data_bytes = max_data_bytes

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(self.proxy)
        return grpc.method_handlers_generic_handler("ProxyService", {"Proxy": method})

    async def proxy(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metrics = self.board.metrics
        frontend_id, link = self.board.open_frontend(f"proxy-stream peer={context.peer()}")
        metrics.grpc_connections.labels("Proxy").inc()
        stream = ServerStream(context)
        try:
            await race(
                read_into(stream, partial(self.board.from_frontend, frontend_id, service_method="Proxy")),
                self._write_loop(stream, link),
                names=(f"frontend-reader id={frontend_id}", f"frontend-writer id={frontend_id}"),
            )
        except* MalformedPacket as group:
            metrics.undecodable_packet("from_client")
            log.warning("malformed packet from frontend, ending stream error=%s", first_error(group))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(first_error(group)))
        finally:
            self.board.close_frontend(frontend_id)
            metrics.grpc_connections.labels("Proxy").dec()

    async def _write_loop(self, stream: ServerStream, link: Link) -> None:
        metrics = self.board.metrics
        observe = metrics.frontend_write_duration.observe
        limit = self.max_data_bytes
        while (queued := await next_outgoing(link.mailbox, limit)) is not None:
            for message in split_data(queued, limit):
                started = time.perf_counter()
                try:
                    await stream.send(message)
                except grpc.aio.BaseError:  # the client went away while we wrote: nothing left to write to
                    metrics.send_failed("to_client", message)
                    return
                observe(time.perf_counter() - started)
                metrics.packet("to_client", message)
        # Everything is written. As the Go server does, leave ending the stream to the client:
        # ending the RPC now would make grpc reset the stream under a client that is still
        # sending, and a grpc.aio client then fails its call and loses what it has not read
        # yet. The reader ends when the client ends its side and cancels this wait; unlike the
        # reference, a client that never does is released after LINGER_SECONDS.
        await asyncio.sleep(LINGER_SECONDS)
