"""Typed tunnel messages, one frozen dataclass per `Packet` payload.

PURE. These are what every module except `wire.py` works with. Field names use the
project's vocabulary: `dial_id` is the wire's `random`, `conn_id` the wire's `connectID`.
Payload bytes never appear in a repr, so they cannot reach a log line by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class DialRequest:
    """Open a TCP connection to `address` (DIAL_REQ)."""

    dial_id: int
    address: str
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class DialResponse:
    """Outcome of a dial (DIAL_RSP): `error` empty and `conn_id` non-zero on success."""

    dial_id: int
    conn_id: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Data:
    """Payload bytes for one connection (DATA).

    `data` may be a memoryview into the packet it was read from. `raw`, when set, is that
    serialized packet: forwarding a DATA unchanged (as the server does both ways) sends it
    as is instead of serializing it again."""

    conn_id: int
    data: bytes | memoryview
    error: str = ""
    raw: bytes | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        return f"Data(conn_id={self.conn_id}, {len(self.data)} bytes)"

    def __eq__(self, other: object) -> bool:
        if type(other) is not Data:
            return NotImplemented
        return (self.conn_id, bytes(self.data), self.error) == (other.conn_id, bytes(other.data), other.error)

    def __hash__(self) -> int:
        return hash((self.conn_id, bytes(self.data), self.error))


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """Ask for an established connection to be closed (CLOSE_REQ)."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class CloseResponse:
    """A connection is closed (CLOSE_RSP), as a reply or because the remote end closed."""

    conn_id: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class CloseDial:
    """Abandon a dial that has no conn_id yet (DIAL_CLS)."""

    dial_id: int


@dataclass(frozen=True, slots=True)
class Drain:
    """Agent to server: avoid me for new dials (DRAIN)."""


@dataclass(frozen=True, slots=True)
class OwnStream:
    """Our extension's switch marker for one connection (per-connection flow control only).

    Agent to server on the Connect stream: no more packets of this connection follow here,
    they go on its own stream (also the first packet of that own stream). Server to agent on
    the Connect stream: likewise, the rest of this connection comes on its own stream. On
    the wire it is a DATA packet with no payload and the reserved error text
    `OWN_STREAM_MARK`, so it never changes how a reference packet is read."""

    conn_id: int


OWN_STREAM_MARK = "konnectivity-py:own-stream"

Message = DialRequest | DialResponse | Data | CloseRequest | CloseResponse | CloseDial | Drain | OwnStream

PACKET_TYPE_NAMES: dict[type[Message], str] = {
    DialRequest: "DIAL_REQ",
    DialResponse: "DIAL_RSP",
    CloseRequest: "CLOSE_REQ",
    CloseResponse: "CLOSE_RSP",
    Data: "DATA",
    CloseDial: "DIAL_CLS",
    Drain: "DRAIN",
    OwnStream: "DATA",  # it travels as a DATA packet
}


def packet_type_name(message: Message) -> str:
    """The reference's enum name for a message, as used in metric labels."""
    return PACKET_TYPE_NAMES[type(message)]
