"""ConnectionService.Stream: one flow-controlled tunnelled connection (our extension).

SHELL. Used only with agents that advertised per-connection flow control on their Connect
stream (see proto/flow.proto). The agent opens this stream after a successful dial,
naming its Connect stream by the session token the server handed out, and sends the
connection's DIAL_RSP first. From then on this stream carries that connection's DATA and
CLOSE packets both ways, so HTTP/2's per-stream window throttles only this connection:
its reader may wait for its frontend as long as it likes without holding up the agent's
other connections.

A connection that started on the shared stream and is moved here (the agent's
`--flow-upgrade-bytes`) starts this stream with an `OwnStream` marker instead: nothing is
read from or written to it before the same marker was read on the shared stream
(`Switchboard.claim_own_link`, bounded), so the connection's packets stay in order.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import grpc

from proxy_common import metadata
from proxy_common.errors import MalformedPacket, TunnelClosed
from proxy_common.messages import DialResponse, OwnStream
from proxy_common.streams import ServerStream
from proxy_common.tasks import first_error, race
from proxy_server.grpc_native import NativeCall
from proxy_server.stream_loops import read_into, write_to_agent
from proxy_server.switchboard import Switchboard

log = logging.getLogger("proxy_server.connections")

SERVICE = "konnectivity_py.flow.v1.ConnectionService"
FIRST_PACKET_SECONDS = 10.0


class ConnectionServicer:
    def __init__(self, board: Switchboard) -> None:
        self.board = board

    async def stream(self, _requests: Any, context: NativeCall) -> None:
        token = metadata.single(context.invocation_metadata(), metadata.SESSION)
        backend_id = self.board.flow_sessions.get(token or "")
        if backend_id is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown or ended agent session")
        assert backend_id is not None
        # Headers now, on their own: riding on the first packet, they would be lost with a
        # write cut short by the stream's end, and grpc would then refuse the final status
        # (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS, logged as an error: ~5% of a churn test's streams).
        await context.send_initial_metadata(())
        stream = ServerStream(context)
        try:
            async with asyncio.timeout(FIRST_PACKET_SECONDS):
                first = await stream.receive()
        except (TimeoutError, TunnelClosed, MalformedPacket):
            first = None
        if type(first) is OwnStream and first.conn_id:
            self.board.metrics.packet("from_agent", first)
            claimed = await self.board.claim_own_link(backend_id, first.conn_id)
            if claimed is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no connection moving onto its own stream")
            assert claimed is not None
            link = claimed
        elif type(first) is not DialResponse or first.error or not first.conn_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a connection stream starts with a successful DIAL_RSP or its marker"
            )
        assert first is not None
        if type(first) is DialResponse:
            link = self.board.open_connection_link(backend_id, first.conn_id, f"conn_id={first.conn_id} backend_id={backend_id}")
        try:
            if type(first) is DialResponse:
                await self.board.from_agent(backend_id, first)
            await race(
                read_into(stream, partial(self.board.from_agent, backend_id, own_stream=True)),
                write_to_agent(stream, link, self.board.metrics),
                names=(f"conn-reader conn_id={first.conn_id}", f"conn-writer conn_id={first.conn_id}"),
            )
        except* MalformedPacket as group:
            self.board.metrics.undecodable_packet("from_agent")
            log.warning("malformed packet on connection stream conn_id=%d error=%s", first.conn_id, first_error(group))
        finally:
            self.board.close_connection_link(backend_id, first.conn_id, link)
