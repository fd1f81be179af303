"""Conversion between serialized `Packet` bytes and typed messages.

PURE. The only module that knows protobuf field names (`connectID`, `random`, the oneof
`payload`). Decoding is lenient where the reference is (a missing payload reads as an
all-zero one, as Go's getters would give) and strict where a packet cannot mean anything
(bytes that do not parse, a payload that contradicts `type`, an unknown type).
Encoding always sets the payload that matches the type, even when it is all zeros,
because the Go peers dereference it unconditionally.
"""

from __future__ import annotations

from typing import assert_never

from google.protobuf.message import DecodeError

from proxy_common.errors import MalformedPacket
from proxy_common.messages import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Drain,
    Message,
)
from proxy_common.pb import client_pb2 as pb

_PAYLOAD_FOR_TYPE = {
    pb.DIAL_REQ: "dialRequest",
    pb.DIAL_RSP: "dialResponse",
    pb.CLOSE_REQ: "closeRequest",
    pb.CLOSE_RSP: "closeResponse",
    pb.DATA: "data",
    pb.DIAL_CLS: "closeDial",
    pb.DRAIN: "drain",
}


def decode(raw: bytes) -> Message:
    """Parse one serialized Packet. Raises MalformedPacket when it means nothing."""
    try:
        packet = pb.Packet.FromString(raw)
    except DecodeError as exc:
        raise MalformedPacket(f"undecodable packet ({len(raw)} bytes): {exc}") from exc
    return from_packet(packet)


def from_packet(packet: pb.Packet) -> Message:
    """Convert a parsed Packet into a typed message."""
    kind = packet.type
    present = packet.WhichOneof("payload")
    if kind == pb.DATA and present == "data":  # the hot path first
        d = packet.data
        return Data(d.connectID, d.data, d.error)
    expected = _PAYLOAD_FOR_TYPE.get(kind)
    if expected is None:
        raise MalformedPacket(f"unknown packet type {kind}")
    if present is not None and present != expected:
        name = pb.PacketType.Name(kind)
        raise MalformedPacket(f"packet type {name} carries a {present} payload")
    return _typed(packet)


def _typed(packet: pb.Packet) -> Message:
    kind = packet.type
    if kind == pb.DATA:
        d = packet.data
        return Data(d.connectID, d.data, d.error)
    if kind == pb.DIAL_REQ:
        r = packet.dialRequest
        return DialRequest(dial_id=r.random, address=r.address, protocol=r.protocol)
    if kind == pb.DIAL_RSP:
        s = packet.dialResponse
        return DialResponse(dial_id=s.random, conn_id=s.connectID, error=s.error)
    if kind == pb.CLOSE_REQ:
        return CloseRequest(packet.closeRequest.connectID)
    if kind == pb.CLOSE_RSP:
        c = packet.closeResponse
        return CloseResponse(c.connectID, c.error)
    if kind == pb.DIAL_CLS:
        return CloseDial(packet.closeDial.random)
    return Drain()


def to_packet(message: Message) -> pb.Packet:
    """Build the Packet for a message, with the matching payload always present."""
    match message:
        case Data(conn_id=conn_id, data=data, error=error):
            return pb.Packet(type=pb.DATA, data=pb.Data(connectID=conn_id, data=data, error=error))
        case DialRequest(dial_id=dial_id, address=address, protocol=protocol):
            request = pb.DialRequest(protocol=protocol, address=address, random=dial_id)
            return pb.Packet(type=pb.DIAL_REQ, dialRequest=request)
        case DialResponse(dial_id=dial_id, conn_id=conn_id, error=error):
            response = pb.DialResponse(error=error, connectID=conn_id, random=dial_id)
            return pb.Packet(type=pb.DIAL_RSP, dialResponse=response)
        case CloseRequest(conn_id=conn_id):
            return pb.Packet(type=pb.CLOSE_REQ, closeRequest=pb.CloseRequest(connectID=conn_id))
        case CloseResponse(conn_id=conn_id, error=error):
            closed = pb.CloseResponse(error=error, connectID=conn_id)
            return pb.Packet(type=pb.CLOSE_RSP, closeResponse=closed)
        case CloseDial(dial_id=dial_id):
            return pb.Packet(type=pb.DIAL_CLS, closeDial=pb.CloseDial(random=dial_id))
        case Drain():
            return pb.Packet(type=pb.DRAIN, drain=pb.Drain())
        case _:
            assert_never(message)


def encode(message: Message) -> bytes:
    """Serialize a message as the Go peers expect it."""
    return to_packet(message).SerializeToString()
