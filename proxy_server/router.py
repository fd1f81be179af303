"""The server's routing table: which frontend owns which dial and which connection.

PURE: no sockets, no asyncio, no clocks, no logging. The shell feeds it what happened and
carries out the returned actions in order.

Theory of operation
-------------------
A *frontend* is one client tunnel: a `Proxy` stream or one HTTP-CONNECT socket. It does
one dial. A *backend* is one agent `Connect` stream (see `backends.py`).

* DIAL_REQ from a frontend picks a backend and becomes a *pending dial*, keyed by its
  `dial_id` server-wide, and the same request goes to that agent.
* The agent's DIAL_RSP resolves it: an error goes back to the frontend, which is then
  ended; a success makes the connection *established*, keyed by `(backend_id, conn_id)`.
  Keying by stream rather than by agent id keeps two streams of one agent apart (the
  agent numbers connections per stream).
* DATA flows both ways between the pair. CLOSE_REQ from the frontend goes to the agent;
  the agent's CLOSE_RSP ends the connection and the frontend.
* When a frontend goes away, its pending dial is abandoned (DIAL_CLS to the agent) and its
  connection is closed (CLOSE_REQ). The entry then waits in *closing* for the agent's
  CLOSE_RSP, so that DATA still in flight is dropped quietly instead of provoking more
  CLOSE_REQs.
* When an agent stream goes away, its pending dials fail at once with an error DIAL_RSP
  (the reference leaves them waiting 30 s) and its connections get an empty-error
  CLOSE_RSP, as the reference sends.

* Own streams on demand (our agents, per-connection flow control): the agent's `OwnStream`
  marker on its Connect stream says that the connection's later packets come on its own
  stream. The router answers `OpenOwnLink` (from now on the connection's packets toward
  the agent go to that stream) and the same marker back on the Connect stream, after
  everything already queued there. If the own stream never comes, `own_stream_missing()`
  closes the connection toward its frontend and asks the agent to close it.

Peer mistakes (unknown ids, DATA before a dial, a second dial on one stream) are answered
on the wire with the reference's error strings; they never raise.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy_common.errors import DialFailure
from proxy_common.identifiers import AgentIdentifiers
from proxy_common.messages import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Drain,
    Message,
    OwnStream,
)
from proxy_server.backends import BackendRegistry

NO_AGENT_ERROR = "No agent available"
AGENT_LOST_ERROR = "agent disconnected before answering the dial"
DIAL_TIMEOUT_ERROR = "timed out waiting for backend dial"
OVERFLOW_ERROR = "connection closed: client stopped reading"
SECOND_DIAL_ERROR = "only one dial per stream is supported"
DUPLICATE_DIAL_ERROR = "a dial with this id is already pending"


@dataclass(frozen=True, slots=True)
class SendToAgent:
    backend_id: int
    message: Message


@dataclass(frozen=True, slots=True)
class SendToFrontend:
    frontend_id: int
    message: Message


@dataclass(frozen=True, slots=True)
class EndFrontend:
    """The frontend's tunnel is over: flush what was sent to it, then end it."""

    frontend_id: int


@dataclass(frozen=True, slots=True)
class DialForwarded:
    dial_id: int
    backend_id: int


@dataclass(frozen=True, slots=True)
class DialEstablished:
    dial_id: int
    backend_id: int
    conn_id: int


@dataclass(frozen=True, slots=True)
class DialFailed:
    dial_id: int
    reason: DialFailure


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    backend_id: int
    conn_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class OpenOwnLink:
    """From now on the connection's packets toward the agent go on its own stream."""

    backend_id: int
    conn_id: int


@dataclass(frozen=True, slots=True)
class Discard:
    message: Message
    reason: str


Action = (
    SendToAgent
    | SendToFrontend
    | EndFrontend
    | DialForwarded
    | DialEstablished
    | DialFailed
    | ConnectionClosed
    | OpenOwnLink
    | Discard
)


@dataclass(frozen=True, slots=True)
class FrontendView:
    """What one frontend is doing, for the debug view (read-only)."""

    state: str  # idle | dialing | established | closing
    dial_id: int | None
    backend_id: int | None
    conn_id: int


@dataclass(slots=True)
class _Frontend:
    dial_id: int | None = None
    backend_id: int | None = None
    conn_id: int = 0
    stopped: bool = False


class Router:
    def __init__(self, registry: BackendRegistry) -> None:
        self.registry = registry
        self._frontends: dict[int, _Frontend] = {}
        self._pending: dict[int, tuple[int, int]] = {}  # dial_id -> (frontend_id, backend_id)
        self._established: dict[tuple[int, int], int] = {}  # (backend_id, conn_id) -> frontend
        self._closing: set[tuple[int, int]] = set()
        self._by_backend: dict[int, set[tuple[str, int]]] = {}  # ("dial"|"conn", id)

    # ----------------------------------------------------------------- observation
    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def established_count(self) -> int:
        return len(self._established)

    def is_empty(self) -> bool:
        return not (self._frontends or self._pending or self._established or self._closing)

    def frontend_connection(self, frontend_id: int) -> tuple[int, int] | None:
        """The (backend_id, conn_id) a frontend's established connection uses."""
        fe = self._frontends.get(frontend_id)
        if fe is None or fe.backend_id is None or not fe.conn_id:
            return None
        key = (fe.backend_id, fe.conn_id)
        return key if key in self._established else None

    def connections(self) -> list[tuple[int, int, int]]:
        """(frontend_id, backend_id, conn_id) of every established connection."""
        return [(fid, bid, cid) for (bid, cid), fid in self._established.items()]

    def frontend_view(self, frontend_id: int) -> FrontendView | None:
        fe = self._frontends.get(frontend_id)
        if fe is None:
            return None
        if fe.backend_id is not None and fe.conn_id and self._established.get((fe.backend_id, fe.conn_id)) == frontend_id:
            state = "established"
        elif fe.dial_id is not None and self._pending.get(fe.dial_id, (None,))[0] == frontend_id:
            state = "dialing"
        elif fe.stopped:
            state = "closing"
        else:
            state = "idle"
        return FrontendView(state, fe.dial_id, fe.backend_id, fe.conn_id)

    def closing_connections(self) -> list[tuple[int, int]]:
        """(backend_id, conn_id) of connections whose frontend left, awaiting the agent's CLOSE_RSP."""
        return sorted(self._closing)

    def backend_load(self, backend_id: int) -> tuple[int, int]:
        """(pending dials, established connections) carried by one agent stream."""
        owned = self._by_backend.get(backend_id, set())
        dials = sum(1 for kind, _ident in owned if kind == "dial")
        return dials, len(owned) - dials

    # ------------------------------------------------------------------ backends
    def agent_connected(self, backend_id: int, agent_id: str, ids: AgentIdentifiers) -> None:
        self.registry.add(backend_id, agent_id, ids)
        self._by_backend[backend_id] = set()

    def agent_lost(self, backend_id: int) -> list[Action]:
        """An agent stream ended: fail its pending dials, close its connections."""
        self.registry.remove(backend_id)
        actions: list[Action] = []
        for kind, ident in sorted(self._by_backend.pop(backend_id, set())):
            if kind == "dial":
                actions += self._fail_pending(ident, AGENT_LOST_ERROR, DialFailure.AGENT_LOST)
            else:
                actions += self._drop_established(backend_id, ident, "agent_lost")
        self._closing = {key for key in self._closing if key[0] != backend_id}
        return actions

    # ----------------------------------------------------------------- frontends
    def frontend_opened(self, frontend_id: int) -> None:
        self._frontends[frontend_id] = _Frontend()

    def from_frontend(self, frontend_id: int, message: Message) -> list[Action]:
        """Decide what to do with one message a frontend sent."""
        fe = self._frontends[frontend_id]
        if type(message) is Data:  # the hot path, kept short
            if fe.stopped or not message.conn_id:
                return []
            if fe.backend_id is not None and message.conn_id == fe.conn_id:
                return [SendToAgent(fe.backend_id, message)]
            return self._bad_data(frontend_id, fe, message)
        if fe.stopped:
            return [Discard(message, "frontend already closing")]
        match message:
            case DialRequest():
                return self._dial(frontend_id, fe, message)
            case CloseRequest(conn_id=conn_id):
                return self._close_request(frontend_id, fe, conn_id)
            case CloseDial(dial_id=dial_id):
                return self._close_dial(frontend_id, fe, dial_id)
            case _:
                return [Discard(message, "not handled from a frontend")]

    def frontend_lost(self, frontend_id: int) -> list[Action]:
        """The frontend's stream or socket is gone: release whatever it held."""
        fe = self._frontends.pop(frontend_id, None)
        if fe is None or fe.backend_id is None:
            return []
        actions: list[Action] = []
        bid = fe.backend_id
        if fe.dial_id is not None and self._pending.get(fe.dial_id, (None,))[0] == frontend_id:
            del self._pending[fe.dial_id]
            self._forget(bid, "dial", fe.dial_id)
            actions += [SendToAgent(bid, CloseDial(fe.dial_id))]
            actions += [DialFailed(fe.dial_id, DialFailure.FRONTEND_CLOSE)]
        key = (bid, fe.conn_id)
        if fe.conn_id and self._established.get(key) == frontend_id:
            actions += self._close_toward_agent(key, "frontend_lost")
        return actions

    def frontend_overflowed(self, frontend_id: int) -> list[Action]:
        """The frontend stopped reading past the bounded wait: close only its connection."""
        fe = self._frontends.get(frontend_id)
        if fe is None or fe.backend_id is None or not fe.conn_id:
            return []
        key = (fe.backend_id, fe.conn_id)
        if self._established.get(key) != frontend_id:
            return []
        fe.stopped = True
        return [
            *self._close_toward_agent(key, "overflow"),
            SendToFrontend(frontend_id, CloseResponse(fe.conn_id, OVERFLOW_ERROR)),
            EndFrontend(frontend_id),
        ]

    def connection_stream_lost(self, backend_id: int, conn_id: int) -> list[Action]:
        """A flow-controlled connection's own stream ended: the agent side is gone."""
        key = (backend_id, conn_id)
        if key in self._closing:
            self._closing.discard(key)
            return []
        if key not in self._established:
            return []
        self._forget(backend_id, "conn", conn_id)
        return self._drop_established(backend_id, conn_id, "stream_lost")

    def own_stream_missing(self, backend_id: int, conn_id: int) -> list[Action]:
        """The agent announced a connection's own stream, but it never came: close the connection."""
        key = (backend_id, conn_id)
        if key in self._closing:
            self._closing.discard(key)
            return [SendToAgent(backend_id, CloseRequest(conn_id))]
        if key not in self._established:
            return []
        self._forget(backend_id, "conn", conn_id)
        return [*self._drop_established(backend_id, conn_id, "stream_lost"), SendToAgent(backend_id, CloseRequest(conn_id))]

    def dial_timed_out(self, dial_id: int) -> list[Action]:
        """The backend dial timeout fired for a dial that may still be pending."""
        entry = self._pending.get(dial_id)
        if entry is None:
            return []
        actions: list[Action] = [SendToAgent(entry[1], CloseDial(dial_id))]
        return actions + self._fail_pending(
            dial_id, DIAL_TIMEOUT_ERROR, DialFailure.BACKEND_DIAL_TIMEOUT
        )

    # -------------------------------------------------------------------- agents
    def from_agent(self, backend_id: int, message: Message) -> list[Action]:
        """Decide what to do with one message an agent stream sent."""
        if type(message) is Data:  # the hot path, kept short
            key = (backend_id, message.conn_id)
            frontend_id = self._established.get(key)
            if frontend_id is not None:
                return [SendToFrontend(frontend_id, message)]
            return self._unknown_agent_data(key, message)
        match message:
            case DialResponse():
                return self._dial_response(backend_id, message)
            case CloseResponse(conn_id=conn_id):
                return self._close_response(backend_id, conn_id, message)
            case CloseDial(dial_id=dial_id):
                return self._agent_close_dial(backend_id, dial_id)
            case Drain():
                self.registry.mark_draining(backend_id)
                return []
            case OwnStream(conn_id=conn_id):
                return self._own_stream(backend_id, conn_id)
            case _:
                return [Discard(message, "not handled from an agent")]

    # ------------------------------------------------------------------ internals
    def _dial(self, fid: int, fe: _Frontend, request: DialRequest) -> list[Action]:
        reply = None
        if fe.dial_id is not None:
            reply = SECOND_DIAL_ERROR
        elif request.dial_id in self._pending:
            reply = DUPLICATE_DIAL_ERROR
        if reply is not None:
            return [SendToFrontend(fid, DialResponse(request.dial_id, error=reply))]
        backend_id = self.registry.pick(request.address)
        if backend_id is None:
            fe.stopped = True
            return [
                SendToFrontend(fid, DialResponse(request.dial_id, error=NO_AGENT_ERROR)),
                DialFailed(request.dial_id, DialFailure.NO_AGENT),
                EndFrontend(fid),
            ]
        fe.dial_id, fe.backend_id = request.dial_id, backend_id
        self._pending[request.dial_id] = (fid, backend_id)
        self._by_backend[backend_id].add(("dial", request.dial_id))
        return [SendToAgent(backend_id, request), DialForwarded(request.dial_id, backend_id)]

    def _bad_data(self, fid: int, fe: _Frontend, data: Data) -> list[Action]:
        if fe.backend_id is None:
            fe.stopped = True
            return [SendToFrontend(fid, CloseResponse(data.conn_id, "backend not initialized"))]
        if not fe.conn_id:
            return [Discard(data, "DATA before the dial completed")]
        # A second conn_id on one stream: the reference closes both and stops.
        fe.stopped = True
        actions: list[Action] = []
        for conn_id in (fe.conn_id, data.conn_id):
            key = (fe.backend_id, conn_id)
            if self._established.get(key) == fid:
                actions += self._close_toward_agent(key, "mismatched")
            else:
                actions.append(SendToAgent(fe.backend_id, CloseRequest(conn_id)))
            actions.append(SendToFrontend(fid, CloseResponse(conn_id, "mismatched connection IDs")))
        return actions

    def _close_request(self, fid: int, fe: _Frontend, conn_id: int) -> list[Action]:
        if fe.backend_id is None:
            return [SendToFrontend(fid, CloseResponse(conn_id, "backend uninitialized"))]
        key = (fe.backend_id, conn_id)
        if self._established.get(key) != fid:
            # Already closed by the remote end, or not this frontend's: nothing to forward.
            return [Discard(CloseRequest(conn_id), "connection not open on this frontend")]
        fe.stopped = True
        return [SendToAgent(fe.backend_id, CloseRequest(conn_id))]

    def _close_dial(self, fid: int, fe: _Frontend, dial_id: int) -> list[Action]:
        entry = self._pending.get(dial_id)
        if entry is None or entry[0] != fid:
            return [Discard(CloseDial(dial_id), "no such pending dial on this frontend")]
        del self._pending[dial_id]
        self._forget(entry[1], "dial", dial_id)
        fe.stopped = True
        return [
            SendToAgent(entry[1], CloseDial(dial_id)),
            DialFailed(dial_id, DialFailure.FRONTEND_CLOSE),
            EndFrontend(fid),
        ]

    def _dial_response(self, bid: int, response: DialResponse) -> list[Action]:
        entry = self._pending.get(response.dial_id)
        if entry is None or entry[1] != bid:
            actions: list[Action] = [DialFailed(response.dial_id, DialFailure.UNRECOGNIZED_RESPONSE)]
            if response.conn_id and not response.error:
                self._closing.add((bid, response.conn_id))
                actions.append(SendToAgent(bid, CloseRequest(response.conn_id)))
            return actions
        fid = entry[0]
        del self._pending[response.dial_id]
        self._forget(bid, "dial", response.dial_id)
        if response.error or not response.conn_id:
            self._frontends[fid].stopped = True
            return [
                SendToFrontend(fid, response),
                DialFailed(response.dial_id, DialFailure.ERROR_RESPONSE),
                EndFrontend(fid),
            ]
        key = (bid, response.conn_id)
        if key in self._established or key in self._closing:
            # The agent reused a live conn_id: refuse the new connection, keep the old one.
            self._frontends[fid].stopped = True
            return [
                SendToFrontend(fid, DialResponse(response.dial_id, error="duplicate connectID")),
                DialFailed(response.dial_id, DialFailure.ERROR_RESPONSE),
                EndFrontend(fid),
            ]
        self._frontends[fid].conn_id = response.conn_id
        self._established[key] = fid
        self._by_backend[bid].add(("conn", response.conn_id))
        return [SendToFrontend(fid, response), DialEstablished(response.dial_id, bid, response.conn_id)]

    def _close_response(self, bid: int, conn_id: int, message: CloseResponse) -> list[Action]:
        key = (bid, conn_id)
        if key in self._closing:
            self._closing.discard(key)
            return []
        fid = self._established.pop(key, None)
        if fid is None:
            return [Discard(message, "unknown connection")]
        self._forget(bid, "conn", conn_id)
        fe = self._frontends.get(fid)
        if fe is not None:
            fe.stopped = True
        return [
            SendToFrontend(fid, message),
            ConnectionClosed(bid, conn_id, "agent_closed"),
            EndFrontend(fid),
        ]

    def _agent_close_dial(self, bid: int, dial_id: int) -> list[Action]:
        entry = self._pending.get(dial_id)
        if entry is None or entry[1] != bid:
            return [Discard(CloseDial(dial_id), "unknown dial")]
        del self._pending[dial_id]
        self._forget(bid, "dial", dial_id)
        fid = entry[0]
        self._frontends[fid].stopped = True
        return [
            SendToFrontend(fid, CloseDial(dial_id)),
            DialFailed(dial_id, DialFailure.BACKEND_CLOSE),
            EndFrontend(fid),
        ]

    def _own_stream(self, bid: int, conn_id: int) -> list[Action]:
        key = (bid, conn_id)
        if key in self._established or key in self._closing:
            return [OpenOwnLink(bid, conn_id), SendToAgent(bid, OwnStream(conn_id))]
        # Not a connection we know: have the agent close it (its own stream is refused).
        return [Discard(OwnStream(conn_id), "unknown connection"), SendToAgent(bid, CloseRequest(conn_id))]

    def _unknown_agent_data(self, key: tuple[int, int], data: Data) -> list[Action]:
        if not data.conn_id or key in self._closing:
            return [Discard(data, "connection closing or id 0")]
        self._closing.add(key)
        return [SendToAgent(key[0], CloseRequest(data.conn_id))]

    def _fail_pending(self, dial_id: int, error: str, reason: DialFailure) -> list[Action]:
        fid, bid = self._pending.pop(dial_id)
        self._forget(bid, "dial", dial_id)
        fe = self._frontends.get(fid)
        if fe is not None:
            fe.stopped = True
        return [
            SendToFrontend(fid, DialResponse(dial_id, error=error)),
            DialFailed(dial_id, reason),
            EndFrontend(fid),
        ]

    def _drop_established(self, bid: int, conn_id: int, reason: str) -> list[Action]:
        fid = self._established.pop((bid, conn_id))
        fe = self._frontends.get(fid)
        if fe is not None:
            fe.stopped = True
        return [
            SendToFrontend(fid, CloseResponse(conn_id)),
            ConnectionClosed(bid, conn_id, reason),
            EndFrontend(fid),
        ]

    def _close_toward_agent(self, key: tuple[int, int], reason: str) -> list[Action]:
        del self._established[key]
        self._forget(key[0], "conn", key[1])
        self._closing.add(key)
        return [SendToAgent(key[0], CloseRequest(key[1])), ConnectionClosed(*key, reason)]

    def _forget(self, bid: int, kind: str, ident: int) -> None:
        owned = self._by_backend.get(bid)
        if owned is not None:
            owned.discard((kind, ident))
