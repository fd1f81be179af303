"""Carries out the router's actions: the server's single executor of routing decisions.

SHELL. Frontends (gRPC Proxy streams, HTTP-CONNECT sockets) and backends (agent Connect
streams) register a *link* here: a mailbox drained by that stream's one writer task.
Readers report what they received; the router decides; this module delivers.

Backpressure: DATA from a frontend to an agent waits for room in the agent's mailbox, so
a busy agent stream slows its frontends' readers (and, through HTTP/2, their clients).
DATA from an agent to a frontend waits at most `overflow_wait` seconds for room in that
frontend's mailbox; past that, only that connection is closed (metric reason `overflow`),
so one client that stops reading cannot hold up the agent's other connections for longer.

Backend dial timeout (`--backend-dial-timeout`, 0 = off): a dial forwarded to an agent
that has not answered within `dial_timeout` seconds fails with the reference's error
(`timed out waiting for backend dial`; 504 in HTTP-CONNECT mode) and the agent gets a
DIAL_CLS. Forwarding itself never waits (control messages are queued at once).

Own streams on demand: when the router moves a connection onto its own stream
(`OpenOwnLink`), its link is created at once, so every later packet toward the agent is
queued there, and the agent's own stream claims it (`claim_own_link`, bounded wait). A
DATA whose delivery was waiting for room on the shared stream chooses its mailbox again
when it may go on, so none lands on the shared stream after the switch marker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from proxy_common.mailbox import Mailbox, MailboxClosed
from proxy_common.messages import CloseRequest, CloseResponse, Data, DialRequest, Message, packet_type_name
from proxy_server import router as r
from proxy_server.metrics import ServerMetrics

log = logging.getLogger("proxy_server")
T = TypeVar("T")
OWN_STREAM_WAIT_SECONDS = 10.0


def message_size(message: Message) -> int:
    return len(message.data) if type(message) is Data else 0


@dataclass(slots=True)
class Link:
    """The sending side of one stream: its mailbox and what to call it in logs."""

    mailbox: Mailbox[Message]
    label: str
    opened: float = field(default_factory=time.monotonic)
    # Frontends only, for the debug view and the byte counters: one integer add per DATA.
    address: str = ""
    bytes_to_agent: int = 0
    bytes_to_client: int = 0


class Switchboard:
    def __init__(
        self,
        router: r.Router,
        metrics: ServerMetrics,
        *,
        frontend_buffer_bytes: int = 4 << 20,
        agent_buffer_bytes: int = 4 << 20,
        overflow_wait: float = 5.0,
        stall_timeout: float = 0.0,
        dial_timeout: float = 0.0,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.frontend_buffer_bytes = frontend_buffer_bytes
        self.agent_buffer_bytes = agent_buffer_bytes
        self.overflow_wait = overflow_wait
        self.stall_timeout = stall_timeout
        self.dial_timeout = dial_timeout
        self._dial_timers: dict[int, asyncio.TimerHandle] = {}
        self.frontends: dict[int, Link] = {}
        self.backends: dict[int, Link] = {}
        self._ids = itertools.count(1)
        self._dial_started: dict[int, float] = {}
        self._conn_started: dict[tuple[int, int], float] = {}
        # Flow-controlled connections (our own agents): one stream, so one Link, per connection.
        self.connection_links: dict[tuple[int, int], Link] = {}
        self.flow_sessions: dict[str, int] = {}  # session token -> backend_id
        # Own streams on demand: links made on the agent's marker, waiting for their stream,
        # and own streams that came before their marker was read.
        self.own_stream_wait = OWN_STREAM_WAIT_SECONDS
        self._unclaimed: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self._claimers: dict[tuple[int, int], asyncio.Future[Link | None]] = {}

    # ------------------------------------------------------------- registration
    def open_frontend(self, label: str) -> tuple[int, Link]:
        frontend_id = next(self._ids)
        link = Link(Mailbox(self.frontend_buffer_bytes, message_size), label)
        self.frontends[frontend_id] = link
        self.router.frontend_opened(frontend_id)
        return frontend_id, link

    def close_frontend(self, frontend_id: int) -> None:
        """The frontend is gone (normally or not): release everything it held."""
        link = self.frontends.pop(frontend_id, None)
        if link is not None:
            link.mailbox.close()
            link.mailbox.clear()
            self.metrics.frontend_closed(link.bytes_to_agent, link.bytes_to_client)
        self.execute_now(self.router.frontend_lost(frontend_id))

    def open_backend(self, agent_id: str, identifiers: r.AgentIdentifiers, label: str) -> tuple[int, Link]:
        backend_id = next(self._ids)
        link = Link(Mailbox(self.agent_buffer_bytes, message_size), label)
        self.backends[backend_id] = link
        self.router.agent_connected(backend_id, agent_id, identifiers)
        self._update_backend_gauges()
        return backend_id, link

    def close_backend(self, backend_id: int) -> None:
        link = self.backends.pop(backend_id, None)
        if link is not None:
            link.mailbox.close()
            link.mailbox.clear()
        for token in [t for t, bid in self.flow_sessions.items() if bid == backend_id]:
            del self.flow_sessions[token]
        for key in [k for k in self.connection_links if k[0] == backend_id]:
            self.connection_links.pop(key).mailbox.close()
        for key in [k for k in self._unclaimed if k[0] == backend_id]:
            self._unclaimed.pop(key).cancel()
        for key in [k for k in self._claimers if k[0] == backend_id]:
            waiter = self._claimers.pop(key)
            if not waiter.done():
                waiter.set_result(None)
        self.execute_now(self.router.agent_lost(backend_id))
        self._update_backend_gauges()

    def open_connection_link(self, backend_id: int, conn_id: int, label: str) -> Link:
        """A flow-controlled connection's own stream to its agent (see proto/flow.proto)."""
        link = Link(Mailbox(self.agent_buffer_bytes, message_size), label)
        self.connection_links[(backend_id, conn_id)] = link
        return link

    async def claim_own_link(self, backend_id: int, conn_id: int) -> Link | None:
        """The link made on the agent's marker for this connection, waiting for it (bounded);
        None if it never comes, is already claimed, or the agent stream ended."""
        key = (backend_id, conn_id)
        timer = self._unclaimed.pop(key, None)
        if timer is not None:
            timer.cancel()
            return self.connection_links.get(key)
        if key in self.connection_links or key in self._claimers or backend_id not in self.backends:
            return None
        waiter: asyncio.Future[Link | None] = asyncio.get_running_loop().create_future()
        self._claimers[key] = waiter
        try:
            async with asyncio.timeout(self.own_stream_wait):
                return await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                return waiter.result()  # handed over in the very turn the wait ran out
            return None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self._own_stream_missing(backend_id, conn_id)  # handed over, but nobody carries it now
            raise
        finally:
            if self._claimers.get(key) is waiter:
                del self._claimers[key]

    def _own_link(self, backend_id: int, conn_id: int) -> None:
        key = (backend_id, conn_id)
        if backend_id not in self.backends or key in self.connection_links:
            return
        link = self.open_connection_link(backend_id, conn_id, f"conn_id={conn_id} backend_id={backend_id}")
        self.metrics.own_stream_upgrades.inc()
        waiter = self._claimers.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(link)
            return
        self._unclaimed[key] = asyncio.get_running_loop().call_later(
            self.own_stream_wait, self._own_stream_missing, backend_id, conn_id
        )

    def _own_stream_missing(self, backend_id: int, conn_id: int) -> None:
        key = (backend_id, conn_id)
        self._unclaimed.pop(key, None)
        log.warning("connection stream never came, closing conn_id=%d agent=%s", conn_id, self._label(backend_id))
        link = self.connection_links.pop(key, None)
        if link is not None:
            link.mailbox.close()
            link.mailbox.clear()
        self.execute_now(self.router.own_stream_missing(backend_id, conn_id))

    def close_connection_link(self, backend_id: int, conn_id: int, link: Link) -> None:
        """The connection's stream ended; if the router still holds the connection, the
        agent side is gone: close it toward its frontend as an agent CLOSE_RSP would."""
        if self.connection_links.get((backend_id, conn_id)) is link:
            del self.connection_links[(backend_id, conn_id)]
        link.mailbox.close()
        link.mailbox.clear()
        if backend_id in self.backends:
            self.execute_now(self.router.connection_stream_lost(backend_id, conn_id))

    def buffered_bytes(self) -> int:
        """Payload bytes queued in every mailbox of this server (the buffered-bytes gauge)."""
        links = [*self.frontends.values(), *self.backends.values(), *self.connection_links.values()]
        return sum(link.mailbox.buffered_bytes for link in links)

    # ---------------------------------------------------------------- happenings
    async def from_frontend(self, frontend_id: int, message: Message, *, service_method: str = "") -> None:
        """A message from a frontend. `service_method` ("Proxy" for gRPC frontends): while its
        reader waits for room toward the agent, it counts in `full_receive_channels`."""
        self.metrics.packet("from_client", message)
        if type(message) is Data:
            link = self.frontends.get(frontend_id)
            if link is not None:
                link.bytes_to_agent += len(message.data)
        elif type(message) is DialRequest and frontend_id in self.frontends:
            self.frontends[frontend_id].address = message.address
        await self.execute(self.router.from_frontend(frontend_id, message), service_method=service_method)

    async def from_agent(
        self, backend_id: int, message: Message, *, own_stream: bool = False, service_method: str = ""
    ) -> None:
        """A message from an agent. `own_stream`: it came on the connection's own stream, so
        waiting for its frontend to read holds up nothing else (no overflow deadline).
        `service_method` ("Connect" for the agent's stream): as in `from_frontend`."""
        self.metrics.packet("from_agent", message)
        if (
            not own_stream
            and type(message) in (Data, CloseResponse)
            and (backend_id, message.conn_id) in self.connection_links  # type: ignore[union-attr]
        ):
            # After its marker, nothing of this connection may come on the shared stream: a
            # stray packet (e.g. the agent's reply to DATA that crossed its marker) would
            # overtake what its own stream still carries.
            log.debug("packet for a connection on its own stream ignored on the shared stream message=%r", message)
            return
        await self.execute(
            self.router.from_agent(backend_id, message), own_stream=own_stream, service_method=service_method
        )
        if type(message) is not Data:
            if own_stream and type(message) is CloseResponse:
                # The agent's last word on this connection: end its stream from our side too,
                # rather than wait for the agent's half-close (a client whose call failed
                # locally never sends one, and its stream would stay open).
                link = self.connection_links.get((backend_id, message.conn_id))
                if link is not None:
                    link.mailbox.close()
            self._update_backend_gauges()

    # ----------------------------------------------------------------- execution
    async def execute(self, actions: Iterable[r.Action], *, own_stream: bool = False, service_method: str = "") -> None:
        """Carry out actions in order; only DATA deliveries may wait."""
        for action in actions:
            if type(action) is r.SendToAgent and type(action.message) is Data:
                await self._data_to_agent(action.backend_id, action.message, service_method)
            elif type(action) is r.SendToFrontend and type(action.message) is Data:
                await self._data_to_frontend(action.frontend_id, action.message, own_stream, service_method)
            else:
                self._carry_out(action)

    def execute_now(self, actions: Iterable[r.Action]) -> None:
        """Carry out actions that never wait (cleanup paths)."""
        for action in actions:
            self._carry_out(action)

    async def _data_to_agent(self, backend_id: int, data: Data, service_method: str = "") -> None:
        key = (backend_id, data.conn_id)
        link = self.connection_links.get(key) or self.backends.get(backend_id)
        if link is None:
            return
        try:
            while not link.mailbox.offer(data):
                await self._blocked(link.mailbox.wait_for_room(), service_method)
                # The connection may have moved onto its own stream meanwhile: choose again.
                link = self.connection_links.get(key) or self.backends.get(backend_id)
                if link is None:
                    return
        except MailboxClosed:
            return
        self.metrics.packet("to_agent", data)

    async def _data_to_frontend(
        self, frontend_id: int, data: Data, own_stream: bool = False, service_method: str = ""
    ) -> None:
        link = self.frontends.get(frontend_id)
        if link is None:
            return
        try:
            if own_stream and not self.stall_timeout:
                # Backpressure reaches the agent through this connection's stream only: wait.
                await link.mailbox.put(data)
                delivered = True
            elif own_stream:
                delivered = await link.mailbox.put_within(data, self.stall_timeout)
            else:
                delivered = link.mailbox.offer(data) or await self._blocked(
                    link.mailbox.put_within(data, self.overflow_wait), service_method
                )
        except MailboxClosed:
            return
        if delivered:
            link.bytes_to_client += len(data.data)
            return
        log.warning(
            "frontend stopped reading, closing its connection frontend=%s wait_seconds=%s",
            link.label,
            self.overflow_wait,
        )
        self.metrics.overflow_closed()
        self.execute_now(self.router.frontend_overflowed(frontend_id))

    async def _blocked(self, delivery: Awaitable[T], service_method: str) -> T:
        """Await a delivery that found its mailbox full. The reader waiting on it is what the
        reference calls a stream blocked on a full receive channel; it is counted meanwhile."""
        if not service_method:
            return await delivery
        gauge = self.metrics.full_receive_channels.labels(service_method)
        gauge.inc()
        try:
            return await delivery
        finally:
            gauge.dec()

    def _carry_out(self, action: r.Action) -> None:
        match action:
            case r.SendToAgent(backend_id=backend_id, message=message):
                link = self.backends.get(backend_id)
                if type(message) is CloseRequest:
                    link = self.connection_links.get((backend_id, message.conn_id)) or link
                if link is not None:
                    link.mailbox.force(message)
                    self.metrics.packet("to_agent", message)
            case r.SendToFrontend(frontend_id=frontend_id, message=message):
                link = self.frontends.get(frontend_id)
                if link is not None and not link.mailbox.closed:
                    link.mailbox.force(message)
            case r.EndFrontend(frontend_id=frontend_id):
                link = self.frontends.get(frontend_id)
                if link is not None:
                    link.mailbox.close()
            case r.OpenOwnLink(backend_id=backend_id, conn_id=conn_id):
                self._own_link(backend_id, conn_id)
            case _:
                self._observe(action)
        self.metrics.tables(self.router.pending_count, self.router.established_count)

    def _observe(self, action: r.Action) -> None:
        now = time.monotonic()
        match action:
            case r.DialForwarded(dial_id=dial_id, backend_id=backend_id):
                self._dial_started[dial_id] = now
                if self.dial_timeout > 0:
                    self._dial_timers[dial_id] = asyncio.get_running_loop().call_later(
                        self.dial_timeout, self._dial_timed_out, dial_id
                    )
                log.debug("dial forwarded dial_id=%d agent=%s", dial_id, self._label(backend_id))
            case r.DialEstablished(dial_id=dial_id, backend_id=backend_id, conn_id=conn_id):
                started = self._dial_started.pop(dial_id, now)
                self._stop_dial_timer(dial_id)
                self.metrics.dial_succeeded(now - started)
                self._conn_started[(backend_id, conn_id)] = now
                log.debug(
                    "connection established dial_id=%d conn_id=%d agent=%s",
                    dial_id, conn_id, self._label(backend_id),
                )
            case r.DialFailed(dial_id=dial_id, reason=reason):
                self._dial_started.pop(dial_id, None)
                self._stop_dial_timer(dial_id)
                self.metrics.dial_failed(reason)
                log.info("dial failed dial_id=%d reason=%s", dial_id, reason)
            case r.ConnectionClosed(backend_id=backend_id, conn_id=conn_id, reason=reason):
                started = self._conn_started.pop((backend_id, conn_id), now)
                self.metrics.connection_closed(now - started, reason)
                log.debug("connection closed conn_id=%d agent=%s reason=%s", conn_id, self._label(backend_id), reason)
            case r.Discard(message=message, reason=reason):
                log.debug("packet ignored type=%s reason=%s", packet_type_name(message), reason)
            case _:
                raise AssertionError(f"unhandled action {action!r}")

    def _dial_timed_out(self, dial_id: int) -> None:
        self._dial_timers.pop(dial_id, None)
        log.info("backend dial timed out dial_id=%d seconds=%s", dial_id, self.dial_timeout)
        self.execute_now(self.router.dial_timed_out(dial_id))

    def _stop_dial_timer(self, dial_id: int) -> None:
        timer = self._dial_timers.pop(dial_id, None)
        if timer is not None:
            timer.cancel()

    def cancel_timers(self) -> None:
        """The server is stopping: no dial timeout fires after this."""
        for timer in self._dial_timers.values():
            timer.cancel()
        self._dial_timers.clear()
        for timer in self._unclaimed.values():
            timer.cancel()
        self._unclaimed.clear()

    # ----------------------------------------------------------- observation
    def live_bytes(self) -> Iterable[tuple[str, int]]:
        """Bytes carried so far by the frontends still open (for the byte counters)."""
        for link in self.frontends.values():
            yield "client_to_agent", link.bytes_to_agent
            yield "agent_to_client", link.bytes_to_client

    def connection_started(self, backend_id: int, conn_id: int) -> float | None:
        """When a connection was established (monotonic clock), if it still is."""
        return self._conn_started.get((backend_id, conn_id))

    def dial_started(self, dial_id: int) -> float | None:
        return self._dial_started.get(dial_id)

    def _label(self, backend_id: int) -> str:
        link = self.backends.get(backend_id)
        return link.label if link else f"backend-{backend_id}"

    def _update_backend_gauges(self) -> None:
        self.metrics.backends(self.router.registry.key_counts())
