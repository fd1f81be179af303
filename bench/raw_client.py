"""A minimal blocking gRPC client on a raw Unix socket, to time dials without client cost.

The project's client library runs on grpc.aio, which spends over a millisecond of CPU per
single-use dial in the calling process (channel, connection, one grpc.aio operation per
message). kube-apiserver dials with the compiled Go konnectivity-client, whose share is far
smaller, so the library's figure overstates what an operator sees. This client speaks just
enough HTTP/2 for one `ProxyService/Proxy` stream per connection, as the Go client does:
preface and SETTINGS, one HEADERS, DATA frames carrying length-prefixed `Packet`s, SETTINGS
and PING acknowledgements, and a close of the connection at the end. It sends only small
packets, so HTTP/2 flow control never comes into play.

Benchmarks only: no TLS, no HPACK decoding (response headers are skipped), no retries.
"""

from __future__ import annotations

import socket
import struct

from proxy_common import wire
from proxy_common.messages import CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Message

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
STREAM = 1


class RawClientError(Exception):
    """The server answered something this client does not expect."""


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (short strings)."""
    name_bytes, value_bytes = name.encode(), value.encode()
    assert len(name_bytes) < 127 and len(value_bytes) < 127
    return b"\x00" + bytes((len(name_bytes),)) + name_bytes + bytes((len(value_bytes),)) + value_bytes


REQUEST_HEADERS = b"".join(
    _literal(name, value)
    for name, value in (
        (":method", "POST"), (":scheme", "http"), (":path", "/ProxyService/Proxy"), (":authority", "localhost"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    )
)


class RawTunnel:
    """One single-use tunnel: its own connection, one stream, blocking calls."""

    def __init__(self, uds_path: str, address: str, *, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buffer = b""  # unparsed bytes from the socket
        self._message = b""  # unparsed gRPC message bytes from DATA frames
        self.conn_id = 0
        try:
            self.sock.connect(uds_path)
            dial_id = 1
            self.sock.sendall(
                PREFACE + _frame(SETTINGS, 0, 0, b"") + _frame(HEADERS, END_HEADERS, STREAM, REQUEST_HEADERS)
                + self._data(DialRequest(dial_id=dial_id, address=address))
            )
            answer = self._next_packet()
            if type(answer) is not DialResponse or answer.dial_id != dial_id or answer.error:
                raise RawClientError(f"dial failed: {answer!r}")
            self.conn_id = answer.conn_id
        except BaseException:
            self.sock.close()
            raise

    @staticmethod
    def _data(message: Message) -> bytes:
        body = wire.encode(message)
        return _frame(DATA, 0, STREAM, b"\x00" + struct.pack(">I", len(body)) + body)

    def _read_frame(self) -> tuple[int, int, int, bytes]:
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    kind, flags = self._buffer[3], self._buffer[4]
                    stream = int.from_bytes(self._buffer[5:9], "big") & 0x7FFFFFFF
                    payload, self._buffer = self._buffer[9 : 9 + length], self._buffer[9 + length :]
                    return kind, flags, stream, payload
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise RawClientError("server closed the connection")
            self._buffer += chunk

    def _next_packet(self) -> Message:
        while True:
            if len(self._message) >= 5:
                length = int.from_bytes(self._message[1:5], "big")
                if len(self._message) >= 5 + length:
                    body, self._message = self._message[5 : 5 + length], self._message[5 + length :]
                    return wire.decode(body)
            kind, flags, stream, payload = self._read_frame()
            if kind == DATA and stream == STREAM:
                self._message += payload
            elif kind == SETTINGS and not flags & ACK:
                self.sock.sendall(_frame(SETTINGS, ACK, 0, b""))
            elif kind == PING and not flags & ACK:
                self.sock.sendall(_frame(PING, ACK, 0, payload))
            elif kind == HEADERS and flags & END_STREAM:
                raise RawClientError("server ended the stream")
            elif kind in (RST_STREAM, GOAWAY):
                raise RawClientError(f"server sent frame type {kind}")

    def send(self, payload: bytes) -> None:
        self.sock.sendall(self._data(Data(self.conn_id, payload)))

    def receive(self) -> bytes:
        """The next DATA payload for this connection; b"" once CLOSE_RSP came."""
        while True:
            packet = self._next_packet()
            if type(packet) is Data and packet.conn_id == self.conn_id:
                return bytes(packet.data)
            if type(packet) is CloseResponse:
                return b""

    def close(self) -> None:
        """CLOSE_REQ, wait for CLOSE_RSP, then close the connection (the Go client's order)."""
        try:
            self.sock.sendall(self._data(CloseRequest(self.conn_id)))
            while self.receive():
                pass
        finally:
            self.sock.close()
