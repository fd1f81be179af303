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
    OWN_STREAM_MARK,
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


_DATA_PREFIX = b"\x08\x04\x22"  # type=DATA, then field 4 (the Data payload), length-delimited
_U64 = (1 << 64) - 1


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Read a protobuf varint at `pos`; returns (value, next position). IndexError if cut."""
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fast_data(raw: bytes) -> Data | None:
    """DATA in the canonical layout every Go and Python peer writes, parsed without copying
    the payload; None for anything else (the general parser then decides)."""
    try:
        inner_len, pos = _varint(raw, 3)
        if pos + inner_len != len(raw):
            return None
        conn_id = 0
        if pos < len(raw) and raw[pos] == 0x08:
            conn_id, pos = _varint(raw, pos + 1)
        if pos < len(raw) and raw[pos] == 0x12:
            return None  # error text present: rare, let protobuf handle it
        payload = memoryview(raw)[0:0]
        if pos < len(raw) and raw[pos] == 0x1A:
            size, pos = _varint(raw, pos + 1)
            if pos + size != len(raw):
                return None
            payload = memoryview(raw)[pos:]
            pos += size
        if pos != len(raw):
            return None
        return Data(_signed(conn_id), payload, "", raw)
    except IndexError:
        return None


def decode(raw: bytes) -> Message:
    """Parse one serialized Packet. Raises MalformedPacket when it means nothing."""
    if raw[:3] == _DATA_PREFIX:
        fast = _fast_data(raw)
        if fast is not None:
            return fast
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
        if d.error == OWN_STREAM_MARK and not d.data:
            return OwnStream(d.connectID)
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
        if d.error == OWN_STREAM_MARK and not d.data:
            return OwnStream(d.connectID)
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
            return pb.Packet(type=pb.DATA, data=pb.Data(connectID=conn_id, data=bytes(data), error=error))
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
        case OwnStream(conn_id=conn_id):
            return pb.Packet(type=pb.DATA, data=pb.Data(connectID=conn_id, error=OWN_STREAM_MARK))
        case _:
            assert_never(message)


def _varint_bytes(value: int) -> bytes:
    value &= _U64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_data(conn_id: int, payload: bytes | memoryview) -> bytes:
    """Serialize DATA{conn_id, payload} with one copy of the payload, byte-identical to
    protobuf's own serialization (fields in number order, zero values omitted)."""
    inner = (b"\x08" + _varint_bytes(conn_id) if conn_id else b"") + (
        b"\x1a" + _varint_bytes(len(payload)) if len(payload) else b""
    )
    return b"".join((_DATA_PREFIX, _varint_bytes(len(inner) + len(payload)), inner, payload))


def encode(message: Message) -> bytes:
    """Serialize a message as the Go peers expect it."""
    if type(message) is Data and not message.error:
        return message.raw if message.raw is not None else encode_data(message.conn_id, message.data)
    return to_packet(message).SerializeToString()
