"""Agent-side table of tunnelled connections for one server stream, keyed by conn_id.

PURE: no sockets, no asyncio, no clocks, no logging. The session feeds it what happened
and carries out the returned actions in order.

Theory of operation
-------------------
A connection is born DIALING when a DIAL_REQ arrives: its conn_id is allocated then, as
the reference agent does (so failed dials use up ids too), but DIAL_RSP is only sent once
the dial has finished. It becomes OPEN on `dial_succeeded()` and leaves the table on
`dial_failed()`, `endpoint_closed()` or `tunnel_lost()`; a DIAL_CLS for a dial still in
progress cancels it (the reference ignores DIAL_CLS; honouring it frees the socket early).

Once the agent drains (first SIGTERM), a DIAL_REQ is answered at once with a DIAL_RSP
error and nothing is dialed, while the open connections carry on: the reference keeps
dialing, but the server only sends a draining agent a dial when it has no other agent,
and a clear refusal then beats a connection cut short by the agent's exit.

Own streams, upgraded on demand (per-connection flow control, `--flow-upgrade-bytes`): an
OPEN connection that has carried enough bytes is moved onto its own stream. The shell calls
`own_stream_started()`, which makes it SWITCHING and returns the marker to queue on the
shared stream after every packet of the connection already queued there (from then on its
packets to the server, CLOSE_RSP included, go on the own stream: `SendOwn`). The server's
marker back (`OwnStream` read from the shared stream) makes it OWN and yields `SwitchDown`:
once the endpoint's inbox is written out, the own stream carries the rest toward the endpoint.

Messages naming a conn_id we do not hold are answered on the wire with the reference's
strings ("unrecognized connectID" for DATA, "Unknown connectID" for CLOSE_REQ), never
raised: one confused peer must not take down the other connections on the stream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy_common.messages import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Message,
    OwnStream,
)

UNRECOGNIZED_CONN_ERROR = "unrecognized connectID"
UNKNOWN_CONN_ERROR = "Unknown connectID"
DRAINING_ERROR = "agent is draining: not accepting new connections"


class ConnState(enum.Enum):
    DIALING = enum.auto()
    OPEN = enum.auto()
    SWITCHING = enum.auto()  # moving onto its own stream: our marker sent, the server's not yet back
    OWN = enum.auto()  # on its own stream both ways


_LIVE = (ConnState.OPEN, ConnState.SWITCHING, ConnState.OWN)


@dataclass(frozen=True, slots=True)
class StartDial:
    conn_id: int
    dial_id: int
    address: str
    protocol: str


@dataclass(frozen=True, slots=True)
class WriteEndpoint:
    conn_id: int
    data: bytes

    def __repr__(self) -> str:
        return f"WriteEndpoint(conn_id={self.conn_id}, {len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class CloseEndpoint:
    conn_id: int


@dataclass(frozen=True, slots=True)
class CancelDial:
    conn_id: int


@dataclass(frozen=True, slots=True)
class Send:
    message: Message


@dataclass(frozen=True, slots=True)
class SendOwn:
    """Send on the connection's own stream (it has left the shared stream)."""

    message: Message


@dataclass(frozen=True, slots=True)
class SwitchDown:
    """The server's marker arrived: after what is queued for the endpoint, read the own stream."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class Discard:
    message: Message
    reason: str


@dataclass(frozen=True, slots=True)
class DialRefused:
    """A dial answered with an error without dialing (the agent is draining)."""

    dial_id: int
    address: str


Action = StartDial | WriteEndpoint | CloseEndpoint | CancelDial | Send | SendOwn | SwitchDown | Discard | DialRefused


@dataclass(slots=True)
class _Conn:
    state: ConnState
    dial_id: int


class ConnectionTable:
    def __init__(self) -> None:
        self._conns: dict[int, _Conn] = {}
        self._dialing: dict[int, int] = {}  # dial_id -> conn_id
        self._last_conn_id = 0
        self.draining = False

    def drain(self) -> None:
        """From now on, refuse new dials; open connections are not touched."""
        self.draining = True

    def __len__(self) -> int:
        return len(self._conns)

    def state(self, conn_id: int) -> ConnState | None:
        conn = self._conns.get(conn_id)
        return conn.state if conn else None

    def open_conn_ids(self) -> list[int]:
        return [cid for cid, conn in self._conns.items() if conn.state in _LIVE]

    def receive(self, message: Message) -> list[Action]:
        """Decide what to do with one message read from the server stream."""
        if type(message) is Data:  # the hot path, kept short
            conn = self._conns.get(message.conn_id)
            if conn is not None and conn.state in _LIVE:
                return [WriteEndpoint(message.conn_id, message.data)]
            if not message.conn_id:
                return [Discard(message, "DATA without conn_id")]
            return [Send(CloseResponse(message.conn_id, UNRECOGNIZED_CONN_ERROR))]
        match message:
            case DialRequest():
                return self._start_dial(message)
            case CloseRequest(conn_id=conn_id):
                conn = self._conns.get(conn_id)
                if conn is None or conn.state not in _LIVE:
                    return [Send(CloseResponse(conn_id, UNKNOWN_CONN_ERROR))]
                return [CloseEndpoint(conn_id)]
            case CloseDial(dial_id=dial_id):
                return self._cancel_dial(dial_id)
            case OwnStream(conn_id=conn_id):
                conn = self._conns.get(conn_id)
                if conn is None or conn.state is not ConnState.SWITCHING:
                    return [Discard(message, "no switch to an own stream in progress")]
                conn.state = ConnState.OWN
                return [SwitchDown(conn_id)]
            case _:
                return [Discard(message, "not sent by a proxy server")]

    def dial_succeeded(self, conn_id: int) -> list[Action]:
        conn = self._conns.get(conn_id)
        if conn is None or conn.state is not ConnState.DIALING:
            return [CloseEndpoint(conn_id)]  # cancelled meanwhile: the socket must go
        conn.state = ConnState.OPEN
        del self._dialing[conn.dial_id]
        return [Send(DialResponse(conn.dial_id, conn_id=conn_id))]

    def own_stream_started(self, conn_id: int) -> list[Action]:
        """The shell opened the connection's own stream: the marker for the shared stream."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.state is not ConnState.OPEN:
            return []
        conn.state = ConnState.SWITCHING
        return [Send(OwnStream(conn_id))]

    def on_own_stream(self, conn_id: int) -> bool:
        """Whether the connection's packets to the server go on its own stream."""
        conn = self._conns.get(conn_id)
        return conn is not None and conn.state in (ConnState.SWITCHING, ConnState.OWN)

    def dial_failed(self, conn_id: int, error: str) -> list[Action]:
        conn = self._conns.get(conn_id)
        if conn is None or conn.state is not ConnState.DIALING:
            return []
        del self._conns[conn_id]
        del self._dialing[conn.dial_id]
        return [Send(DialResponse(conn.dial_id, error=error))]

    def endpoint_closed(self, conn_id: int) -> list[Action]:
        """The endpoint socket is gone: EOF, reset, or a close we asked for finished."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.state not in _LIVE:
            return []
        del self._conns[conn_id]
        if conn.state is ConnState.OPEN:
            return [Send(CloseResponse(conn_id))]
        return [SendOwn(CloseResponse(conn_id))]

    def inbox_overflowed(self, conn_id: int) -> list[Action]:
        """The endpoint stopped reading past the bounded wait: close only it."""
        if self.state(conn_id) not in _LIVE:
            return []
        return [CloseEndpoint(conn_id)]

    def tunnel_lost(self) -> list[Action]:
        """The server stream is gone: every connection it carried goes too."""
        actions: list[Action] = []
        for conn_id, conn in self._conns.items():
            actions.append(CancelDial(conn_id) if conn.state is ConnState.DIALING else CloseEndpoint(conn_id))
        self._conns.clear()
        self._dialing.clear()
        return actions

    def _start_dial(self, request: DialRequest) -> list[Action]:
        if self.draining:
            return [Send(DialResponse(request.dial_id, error=DRAINING_ERROR)), DialRefused(request.dial_id, request.address)]
        self._last_conn_id += 1
        conn_id = self._last_conn_id
        if request.dial_id in self._dialing:
            return [Send(DialResponse(request.dial_id, error="duplicate dial id"))]
        self._conns[conn_id] = _Conn(ConnState.DIALING, request.dial_id)
        self._dialing[request.dial_id] = conn_id
        return [StartDial(conn_id, request.dial_id, request.address, request.protocol)]

    def _cancel_dial(self, dial_id: int) -> list[Action]:
        conn_id = self._dialing.pop(dial_id, None)
        if conn_id is None:
            return [Discard(CloseDial(dial_id), "no such dial in progress")]
        del self._conns[conn_id]
        return [CancelDial(conn_id)]
