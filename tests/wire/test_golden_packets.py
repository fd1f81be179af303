"""Every packet recorded from the Go implementation decodes to its recorded fields and
re-encodes to the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy_common import wire
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

DATA_DIR = Path(__file__).parent / "data"
INDEX = json.loads((DATA_DIR / "index.json").read_text())
RECORDED = [p for p in INDEX["packets"] if "file" in p and (DATA_DIR / p["file"]).exists()]


def expected_message(fields: dict) -> Message:
    """Build the message the recorded JSON fields describe."""
    kind = fields["type"].split("(")[0]
    if kind == "DIAL_REQ":
        r = fields["dialRequest"]
        return DialRequest(dial_id=r.get("random", 0), address=r.get("address", ""), protocol=r.get("protocol", ""))
    if kind == "DIAL_RSP":
        r = fields["dialResponse"]
        return DialResponse(dial_id=r.get("random", 0), conn_id=r.get("connectID", 0), error=r.get("error", ""))
    if kind == "CLOSE_REQ":
        return CloseRequest(fields["closeRequest"].get("connectID", 0))
    if kind == "CLOSE_RSP":
        r = fields["closeResponse"]
        return CloseResponse(r.get("connectID", 0), r.get("error", ""))
    if kind == "DATA":
        r = fields["data"]
        payload = r["data_text"].encode() if "data_text" in r else bytes.fromhex(r.get("data_hex", ""))
        return Data(r.get("connectID", 0), payload, r.get("error", ""))
    if kind == "DIAL_CLS":
        return CloseDial(fields["closeDial"].get("random", 0))
    assert kind == "DRAIN"
    return Drain()


def test_every_recorded_file_is_covered() -> None:
    assert len(RECORDED) == 20


@pytest.mark.parametrize("packet", RECORDED, ids=[p["name"] for p in RECORDED])
def test_recorded_packet_decodes_to_its_fields(packet: dict) -> None:
    raw = (DATA_DIR / packet["file"]).read_bytes()
    assert raw.hex() == packet["hex"] if "hex" in packet else True
    assert wire.decode(raw) == expected_message(packet["fields"])


@pytest.mark.parametrize(
    "packet", [p for p in RECORDED if p["name"] != "DRAIN_no_payload"], ids=lambda p: p["name"]
)
def test_recorded_packet_reencodes_to_the_same_bytes(packet: dict) -> None:
    raw = (DATA_DIR / packet["file"]).read_bytes()
    assert wire.encode(wire.decode(raw)) == raw


def test_drain_without_payload_is_read_and_written_with_one() -> None:
    raw = (DATA_DIR / "DRAIN_no_payload.bin").read_bytes()
    assert wire.decode(raw) == Drain()
    assert wire.encode(Drain()) == bytes.fromhex("08064200")


@pytest.mark.parametrize(
    ("message", "hex_bytes"),
    [
        (DialRequest(dial_id=1, address="10.0.0.5:10250"), "12170a037463701 20e31302e302e302e353a31303235301801".replace(" ", "")),
        (DialResponse(dial_id=1, conn_id=1), "08011a0410011801"),
        (Data(1, b"hi"), "0804220608011a026869"),
        (CloseRequest(1), "08022a020801"),
        (CloseResponse(1), "0803320210 01".replace(" ", "")),
        (CloseResponse(0), "08033200"),
        (CloseDial(1), "08053a020801"),
        (Drain(), "08064200"),
    ],
)
def test_protocol_doc_test_vectors(message: Message, hex_bytes: str) -> None:
    assert wire.encode(message).hex() == hex_bytes


def test_payload_contradicting_type_is_malformed() -> None:
    from proxy_common.pb import client_pb2 as pb

    raw = pb.Packet(type=pb.DATA, dialRequest=pb.DialRequest(address="x")).SerializeToString()
    with pytest.raises(MalformedPacket, match="DATA carries a dialRequest"):
        wire.decode(raw)


def test_unknown_type_is_malformed() -> None:
    with pytest.raises(MalformedPacket, match="unknown packet type 42"):
        wire.decode(bytes.fromhex("082a"))


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_malformed(raw: bytes) -> None:
    try:
        message = wire.decode(raw)
    except MalformedPacket:
        return
    assert wire.decode(wire.encode(message)) == message


@given(conn_id=st.integers(-(2**63), 2**63 - 1), payload=st.binary(max_size=300))
def test_fast_data_encoding_is_byte_identical_to_protobuf(conn_id: int, payload: bytes) -> None:
    from proxy_common.pb import client_pb2 as pb

    expected = pb.Packet(type=pb.DATA, data=pb.Data(connectID=conn_id, data=payload)).SerializeToString()
    assert wire.encode_data(conn_id, payload) == expected
    decoded = wire.decode(expected)
    assert decoded == Data(conn_id, payload)
    assert wire.encode(decoded) == expected  # forwarded unchanged


def test_fast_path_declines_unusual_layouts() -> None:
    from proxy_common.pb import client_pb2 as pb

    reordered = bytes.fromhex("08042206") + bytes.fromhex("1a0268690807")  # data before connectID
    packet = pb.Packet.FromString(reordered)
    assert (packet.data.connectID, packet.data.data) == (7, b"hi")
    assert wire.decode(reordered) == Data(7, b"hi")
    truncated = wire.encode_data(7, b"hello")[:-1]
    with pytest.raises(MalformedPacket):
        wire.decode(truncated)
