"""AgentService.Connect: one agent stream, registered as a backend while it lasts.

SHELL. The first lines of `connect` are the whole admission policy: exactly one `agentid`,
at most one parsable `agentidentifiers`, then authentication. Only after that are the
`serverid`/`servercount` response headers sent, at once, because the Go agent waits for
them with no timeout. From then on one reader feeds the switchboard and one writer
drains this backend's mailbox; when either ends, the backend's dials and connections are
failed or closed toward their frontends.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import grpc

from proxy_common import identifiers, metadata
from proxy_common.errors import AuthError, MalformedPacket
from proxy_common.streams import ServerStream
from proxy_common.tasks import first_error, race
from proxy_server.grpc_native import NativeCall
from proxy_server.stream_loops import read_into, write_to_agent
from proxy_server.switchboard import Switchboard

log = logging.getLogger("proxy_server.agents")

Authenticator = Callable[[metadata.Metadata], Awaitable[None]]


class AgentServicer:
    def __init__(
        self,
        board: Switchboard,
        *,
        server_id: str,
        server_count: int,
        authenticate: Authenticator | None = None,
        flow_control: bool = True,
    ) -> None:
        self.board = board
        self.server_id = server_id
        self.server_count = server_count
        self.authenticate = authenticate
        self.flow_control = flow_control

    async def connect(self, _requests: Any, context: NativeCall) -> None:
        md = tuple(context.invocation_metadata() or ())
        agent_id = metadata.single(md, metadata.AGENT_ID)
        if agent_id is None:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "expected exactly one agentid header")
        ids_values = metadata.values(md, metadata.AGENT_IDENTIFIERS)
        if len(ids_values) > 1:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "expected at most one agentidentifiers header")
        try:
            agent_ids = identifiers.parse(ids_values[0] if ids_values else "")
        except identifiers.IdentifierError as exc:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid agentidentifiers: {exc}")
        if self.authenticate is not None:
            try:
                await self.authenticate(md)
            except AuthError as exc:
                # The reference's status: a plain Go error, i.e. UNKNOWN with its message (trailers only).
                log.warning("agent refused agent_id=%s peer=%s reason=%s", agent_id, context.peer(), exc)
                await self._refuse(context, grpc.StatusCode.UNKNOWN, str(exc))
        headers = [(metadata.SERVER_ID, self.server_id), (metadata.SERVER_COUNT, str(self.server_count))]
        flow_token = None
        if self.flow_control and metadata.single(md, metadata.FLOW_CONTROL) == metadata.FLOW_CONTROL_VERSION:
            # Our own agent: offer one stream per connection. Go agents get exactly the reference headers.
            flow_token = secrets.token_hex(16)
            headers += [(metadata.FLOW_CONTROL, metadata.FLOW_CONTROL_VERSION), (metadata.SESSION, flow_token)]
        await context.send_initial_metadata(tuple(headers))
        assert agent_id is not None
        await self._serve(context, agent_id, agent_ids, flow_token)

    async def _serve(
        self,
        context: NativeCall,
        agent_id: str,
        agent_ids: identifiers.AgentIdentifiers,
        flow_token: str | None = None,
    ) -> None:
        metrics = self.board.metrics
        label = f"agent_id={agent_id} peer={context.peer()}"
        backend_id, link = self.board.open_backend(agent_id, agent_ids, label)
        if flow_token is not None:
            self.board.flow_sessions[flow_token] = backend_id
        metrics.grpc_connections.labels("Connect").inc()
        log.info("agent connected %s backend_id=%d", label, backend_id)
        stream = ServerStream(context)
        try:
            await race(
                read_into(stream, partial(self.board.from_agent, backend_id, service_method="Connect")),
                write_to_agent(stream, link, metrics),
                names=(f"agent-reader {label}", f"agent-writer {label}"),
            )
        except* MalformedPacket as group:
            metrics.undecodable_packet("from_agent")
            log.warning("malformed packet from agent, ending stream %s error=%s", label, first_error(group))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(first_error(group)))
        finally:
            self.board.close_backend(backend_id)
            metrics.grpc_connections.labels("Connect").dec()
            log.info("agent disconnected %s backend_id=%d", label, backend_id)

    @staticmethod
    async def _refuse(context: NativeCall, code: grpc.StatusCode, reason: str) -> None:
        await context.abort(code, reason)
