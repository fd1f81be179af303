"""The Go konnectivity-client's HTTP/2 conversation (tests/interop/client-grpc-transcript.json,
case "normal"), spoken frame by frame over the real server's Unix socket: its request
headers, its BDP PINGs beside the data, and its abrupt close after CLOSE_RSP."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import hpack
import pytest

from proxy_common import wire
from proxy_common.messages import CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Message
from proxy_server import h2_core as h2
from tests.harness import Stack, echo_handler, endpoint

pytestmark = pytest.mark.integration

TRANSCRIPT = json.loads((Path(__file__).parents[1] / "interop" / "client-grpc-transcript.json").read_text())
REQUEST = [(name.encode(), value.encode()) for name, value in TRANSCRIPT["request_http2_headers"]]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream_id) + payload


def grpc_message(message: Message) -> bytes:
    packet = wire.encode(message)
    return b"\x00" + len(packet).to_bytes(4, "big") + packet


class GoLikeClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = hpack.Decoder()
        self.headers: list[dict[str, str]] = []
        self.ping_acks: list[bytes] = []
        self.settings_acked = False
        self._buffer = b""

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        length_type, flags, stream_id = struct.unpack(">IBI", head)
        payload = await asyncio.wait_for(self.reader.readexactly(length_type >> 8), 5)
        return length_type & 0xFF, flags, stream_id, payload

    async def packet(self) -> Message:
        """The next gRPC message on stream 1, noting headers, PING ACKs and SETTINGS on the way."""
        while True:
            if len(self._buffer) >= 5 and len(self._buffer) >= 5 + int.from_bytes(self._buffer[1:5], "big"):
                size = int.from_bytes(self._buffer[1:5], "big")
                packet, self._buffer = self._buffer[5:5 + size], self._buffer[5 + size:]
                return wire.decode(packet)
            kind, flags, stream_id, payload = await self.frame()
            if kind == h2.DATA:
                assert stream_id == 1
                self._buffer += payload
            elif kind == h2.HEADERS:
                self.headers.append({k.decode(): v.decode() for k, v in self.decoder.decode(payload, raw=True)})
            elif kind == h2.PING and flags & h2.ACK:
                self.ping_acks.append(payload)
            elif kind == h2.SETTINGS and flags & h2.ACK:
                self.settings_acked = True
            elif kind == h2.SETTINGS:
                self.writer.write(frame(h2.SETTINGS, h2.ACK, 0))
            else:
                assert kind == h2.WINDOW_UPDATE, f"unexpected frame type {kind}"

    def send(self, message: Message, *, bdp_ping: bytes) -> None:
        """As grpc-go does with BDP estimation on: a PING goes out with the DATA."""
        self.writer.write(frame(h2.PING, 0, 0, bdp_ping) + frame(h2.DATA, 0, 1, grpc_message(message)))


async def test_a_go_clients_conversation_works_and_its_abrupt_close_leaves_nothing(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(echo_handler) as ep:
        reader, writer = await asyncio.open_unix_connection(stack.uds)
        client = GoLikeClient(reader, writer)
        try:
            writer.write(h2.PREFACE + frame(h2.SETTINGS, 0, 0)
                         + frame(h2.HEADERS, h2.END_HEADERS, 1, hpack.Encoder().encode(REQUEST)))
            client.send(DialRequest(3885092764124154726, ep.address), bdp_ping=b"bdp-0001")
            answer = await client.packet()
            assert isinstance(answer, DialResponse) and answer.dial_id == 3885092764124154726 and not answer.error
            assert client.headers == [{":status": "200", "content-type": "application/grpc"}]
            client.send(Data(answer.conn_id, b"GET /success HTTP/1.1\r\n\r\n"), bdp_ping=b"bdp-0002")
            echoed = await client.packet()
            assert isinstance(echoed, Data) and bytes(echoed.data) == b"GET /success HTTP/1.1\r\n\r\n"
            client.send(CloseRequest(answer.conn_id), bdp_ping=b"bdp-0003")
            closed = await client.packet()
            assert isinstance(closed, CloseResponse) and closed.conn_id == answer.conn_id
            assert client.ping_acks == [b"bdp-0001", b"bdp-0002", b"bdp-0003"]
            assert client.settings_acked
        finally:
            writer.transport.abort()  # the Go client's plain close right after CLOSE_RSP
    await stack.wait_idle()
