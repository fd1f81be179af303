"""h2_core: the frontend's HTTP/2 + gRPC state machine, driven with raw frames (no sockets)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import hpack
import pytest

from proxy_server import h2_core as h2
from proxy_server.h2_core import (
    CallEnded,
    CallStarted,
    ConnectionClosing,
    Drained,
    HalfClosed,
    MessageReceived,
    PingAcked,
    ServerConnection,
)

GO_CLIENT = json.loads((Path(__file__).parents[1] / "interop" / "client-grpc-transcript.json").read_text())
REQUEST = [(name.encode(), value.encode()) for name, value in GO_CLIENT["request_http2_headers"]]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream_id) + payload


def settings(**values: int) -> bytes:
    codes = {"window": h2.SETTINGS_INITIAL_WINDOW_SIZE, "frame": h2.SETTINGS_MAX_FRAME_SIZE}
    return frame(h2.SETTINGS, 0, 0, b"".join(struct.pack(">HI", codes[k], v) for k, v in values.items()))


def message(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


class Peer:
    """The client side: encodes what it sends, decodes what the server wrote."""

    def __init__(self, **client_settings: int) -> None:
        self.conn = ServerConnection(max_message_bytes=2 << 20)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.conn.initiate()
        self.events = self.send(h2.PREFACE + settings(**client_settings))
        self.frames = self.read()

    def send(self, data: bytes) -> list[h2.Event]:
        return self.conn.receive(data)

    def start(self, stream_id: int = 1, headers: list[tuple[bytes, bytes]] = REQUEST, end_stream: bool = False) -> list[h2.Event]:
        block = self.encoder.encode(headers)
        pieces = [block[i:i + 16_384] for i in range(0, len(block), 16_384)]
        end = h2.END_STREAM if end_stream else 0
        if len(pieces) == 1:
            return self.send(frame(h2.HEADERS, h2.END_HEADERS | end, stream_id, block))
        data = frame(h2.HEADERS, end, stream_id, pieces[0])
        data += b"".join(frame(h2.CONTINUATION, 0, stream_id, piece) for piece in pieces[1:-1])
        return self.send(data + frame(h2.CONTINUATION, h2.END_HEADERS, stream_id, pieces[-1]))

    def read(self) -> list[tuple[int, int, int, object]]:
        """(type, flags, stream, payload: bytes, or decoded headers for HEADERS)."""
        data = b"".join(bytes(part) for part in self.conn.data_to_send())
        frames = []
        pos = 0
        while pos < len(data):
            head, flags, stream_id = struct.unpack_from(">IBI", data, pos)
            length, kind = head >> 8, head & 0xFF
            payload: object = data[pos + 9:pos + 9 + length]
            if kind == h2.HEADERS:
                payload = {k.decode(): v.decode() for k, v in self.decoder.decode(payload, raw=True)}
            frames.append((kind, flags, stream_id, payload))
            pos += 9 + length
        return frames


def data_payload(frames: list[tuple[int, int, int, object]], stream_id: int = 1) -> bytes:
    return b"".join(p for kind, _, sid, p in frames if kind == h2.DATA and sid == stream_id)  # type: ignore[misc]


def test_handshake_and_a_go_clients_request() -> None:
    peer = Peer()
    kinds = [(kind, flags) for kind, flags, _, _ in peer.frames]
    assert kinds == [(h2.SETTINGS, 0), (h2.WINDOW_UPDATE, 0), (h2.SETTINGS, h2.ACK)]
    [started] = peer.start()
    assert isinstance(started, CallStarted)
    assert started.path == "/ProxyService/Proxy" and started.timeout is None
    assert dict(started.fields)["user-agent"] == "test-client grpc-go/1.83.0"


def test_messages_cut_out_of_any_split_of_the_bytes() -> None:
    peer = Peer()
    peer.start()
    wire = message(b"a" * 40) + message(b"") + message(b"b" * 3)
    stream = frame(h2.DATA, 0, 1, wire[:17]) + frame(h2.DATA, 0, 1, wire[17:]) + frame(h2.DATA, h2.END_STREAM, 1)
    events: list[h2.Event] = []
    for i in range(len(stream)):  # one byte at a time
        events += peer.send(stream[i:i + 1])
    got = [(type(e).__name__, getattr(e, "payload", None)) for e in events]
    assert got == [("MessageReceived", b"a" * 40), ("MessageReceived", b""), ("MessageReceived", b"bbb"),
                   ("HalfClosed", None)]


def test_output_waits_for_the_clients_windows_and_says_when_it_drained() -> None:
    peer = Peer(window=10)
    peer.start()
    assert peer.conn.send_message(1, b"x" * 100)
    first = peer.read()
    assert [f[0] for f in first] == [h2.HEADERS, h2.DATA]
    assert data_payload(first) == message(b"x" * 100)[:10]
    assert peer.conn.pending(1) == 95
    events = peer.send(frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 1000)))
    assert [type(e) for e in events] == [Drained]
    assert data_payload(peer.read()) == message(b"x" * 100)[10:]
    assert peer.conn.pending(1) == 0


def test_the_connection_window_is_shared_and_blocked_calls_resume_in_order() -> None:
    peer = Peer(window=1 << 20)
    peer.start(1)
    peer.start(3)
    peer.conn.send_message(1, b"a" * 60_000)
    peer.conn.send_message(3, b"b" * 10_000)  # only 5525 bytes of connection window were left
    peer.read()
    assert peer.conn.pending(1) == 0 and peer.conn.pending(3) == 10_005 - (65_535 - 60_005)
    events = peer.send(frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20)))
    assert [type(e) for e in events] == [Drained]
    assert data_payload(peer.read(), 3).endswith(b"b" * 100)


def test_trailers_follow_queued_output_and_a_client_still_sending_is_stopped() -> None:
    peer = Peer(window=3)
    peer.start()
    peer.conn.send_message(1, b"hello")
    peer.conn.end_call(1, h2.UNAVAILABLE, "gone 100%")
    assert [f[0] for f in peer.read()] == [h2.HEADERS, h2.DATA]  # trailers wait behind the data
    peer.send(frame(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)))
    frames = peer.read()
    assert [(f[0], f[1]) for f in frames] == [(h2.DATA, 0), (h2.HEADERS, h2.END_STREAM | h2.END_HEADERS), (h2.RST_STREAM, 0)]
    assert frames[1][3] == {"grpc-status": "14", "grpc-message": "gone 100%25"}
    assert peer.conn.calls == 0
    assert peer.send(frame(h2.DATA, 0, 1, message(b"late"))) == []  # dropped, not an error


def test_a_call_ended_without_messages_gets_a_trailers_only_response() -> None:
    peer = Peer()
    peer.start(end_stream=True)
    peer.conn.end_call(1, h2.OK)
    [(kind, flags, _, headers)] = peer.read()
    assert kind == h2.HEADERS and flags & h2.END_STREAM
    assert headers == {":status": "200", "content-type": "application/grpc", "grpc-status": "0"}


def test_a_message_bigger_than_the_window_still_arrives() -> None:
    peer = Peer()
    peer.start()
    big = message(b"z" * (h2.STREAM_WINDOW + 100))
    events: list[h2.Event] = []
    granted = h2.STREAM_WINDOW
    sent = 0
    while sent < len(big):
        size = min(16_384, len(big) - sent, granted - sent)
        assert size > 0, "the window never opened for the rest of the message"
        events += peer.send(frame(h2.DATA, 0, 1, big[sent:sent + size]))
        sent += size
        granted += sum(struct.unpack(">I", p)[0] for kind, _, sid, p in peer.read() if kind == h2.WINDOW_UPDATE and sid == 1)
    assert [len(e.payload) for e in events if isinstance(e, MessageReceived)] == [h2.STREAM_WINDOW + 100]


def test_reading_gives_the_window_back_in_halves() -> None:
    peer = Peer()
    peer.start()
    peer.read()
    peer.conn.consumed(1, h2.STREAM_WINDOW // 2 - 1)
    assert peer.read() == []
    peer.conn.consumed(1, 1)
    assert peer.read() == [(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", h2.STREAM_WINDOW // 2))]


@pytest.mark.parametrize(("payload", "status", "text"), [
    (message(b"x" * ((2 << 20) + 1)), "8", "received message larger than max"),
    (message(b"x", flag=1), "13", "compressed message"),
])
def test_bad_messages_end_the_call_with_a_status(payload: bytes, status: str, text: str) -> None:
    peer = Peer()
    peer.start()
    peer.read()
    events = peer.send(frame(h2.DATA, 0, 1, payload[:9000]))
    assert [type(e) for e in events] == [CallEnded]
    trailers = next(p for kind, _, _, p in peer.read() if kind == h2.HEADERS)
    assert trailers["grpc-status"] == status and text in trailers["grpc-message"]  # type: ignore[index]


@pytest.mark.parametrize(("change", "status"), [
    ((b"content-type", b"application/json"), "13"),
    ((b"grpc-encoding", b"gzip"), "12"),
])
def test_requests_we_cannot_serve_are_answered_without_a_call(change: tuple[bytes, bytes], status: str) -> None:
    peer = Peer()
    headers = [h for h in REQUEST if h[0] != change[0]] + [change]
    assert peer.start(headers=headers) == []
    trailers = next(p for kind, _, _, p in peer.read() if kind == h2.HEADERS)
    assert trailers["grpc-status"] == status  # type: ignore[index]


def test_client_reset_ends_the_call() -> None:
    peer = Peer()
    peer.start()
    [ended] = peer.send(frame(h2.RST_STREAM, 0, 1, struct.pack(">I", h2.CANCEL)))
    assert isinstance(ended, CallEnded) and "code 8" in ended.reason
    assert peer.conn.calls == 0


def test_ping_is_answered_and_our_ping_ack_reported() -> None:
    peer = Peer()
    assert peer.send(frame(h2.PING, 0, 0, b"12345678")) == []
    assert peer.read() == [(h2.PING, h2.ACK, 0, b"12345678")]
    peer.conn.ping()
    peer.read()
    assert [type(e) for e in peer.send(frame(h2.PING, h2.ACK, 0, b"\0" * 8))] == [PingAcked]


def test_padding_and_continuation() -> None:
    peer = Peer()
    block = peer.encoder.encode(REQUEST)
    padded = bytes([3]) + block[:10] + b"\0\0\0"
    assert peer.send(frame(h2.HEADERS, h2.PADDED, 1, padded)) == []
    [started] = peer.send(frame(h2.CONTINUATION, h2.END_HEADERS, 1, block[10:]))
    assert isinstance(started, CallStarted)
    [got] = peer.send(frame(h2.DATA, h2.PADDED, 1, bytes([2]) + message(b"hi") + b"\0\0"))
    assert isinstance(got, MessageReceived) and got.payload == b"hi"


@pytest.mark.parametrize(("data", "code"), [
    (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20, h2.PROTOCOL_ERROR),
    (h2.PREFACE + frame(h2.PING, 0, 0, b"\0" * 8), h2.PROTOCOL_ERROR),  # SETTINGS must come first
    (h2.PREFACE + settings() + frame(h2.DATA, 0, 7, b"x"), h2.PROTOCOL_ERROR),  # idle stream
    (h2.PREFACE + settings() + frame(h2.HEADERS, h2.END_HEADERS, 2, b""), h2.PROTOCOL_ERROR),  # even id
    (h2.PREFACE + settings() + frame(h2.DATA, 0, 1, b"x" * 16_385), h2.FRAME_SIZE_ERROR),
    (h2.PREFACE + settings() + frame(h2.HEADERS, 0, 1, b"") + frame(h2.PING, 0, 0, b"\0" * 8), h2.PROTOCOL_ERROR),
    (h2.PREFACE + settings() + frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\xff"), h2.COMPRESSION_ERROR),
])
def test_protocol_errors_end_the_connection_with_goaway(data: bytes, code: int) -> None:
    conn = ServerConnection(max_message_bytes=1 << 20)
    events = conn.receive(data)
    assert isinstance(events[-1], ConnectionClosing) and events[-1].code == code
    out = b"".join(bytes(part) for part in conn.data_to_send())
    assert struct.pack(">IBI", 8 + len(events[-1].detail.encode()) << 8 | h2.GOAWAY, 0, 0) in out
    assert conn.receive(frame(h2.PING, 0, 0, b"\0" * 8)) == []  # nothing more is read


def test_after_goaway_new_calls_are_refused_and_old_ones_go_on() -> None:
    peer = Peer()
    peer.start(1)
    peer.conn.goaway()
    assert peer.start(3) == []
    assert (h2.RST_STREAM, 0, 3, struct.pack(">I", h2.REFUSED_STREAM)) in peer.read()
    assert [type(e) for e in peer.send(frame(h2.DATA, h2.END_STREAM, 1, message(b"x")))] == [MessageReceived, HalfClosed]


@pytest.mark.parametrize(("value", "seconds"), [("5S", 5.0), ("100m", 0.1), ("1H", 3600.0), ("3u", 3e-6),
                                                 ("S", None), ("123456789S", None), ("5x", None)])
def test_grpc_timeout(value: str, seconds: float | None) -> None:
    assert h2.parse_timeout(value) == seconds


def test_a_broken_call_with_output_still_queued_is_reset_not_given_a_status() -> None:
    """Its trailers (or half a message) are queued behind the window: a status now would
    follow a cut-off message, so the call is reset and leaves the connection."""
    peer = Peer(window=10)
    peer.start()
    peer.conn.send_message(1, b"x" * 100)
    peer.conn.end_call(1, h2.OK)
    peer.read()
    [ended] = peer.send(frame(h2.DATA, 0, 1, message(b"x", flag=1)))
    assert isinstance(ended, CallEnded)
    assert peer.read() == [(h2.RST_STREAM, 0, 1, struct.pack(">I", h2.CANCEL))]
    assert peer.conn.calls == 0


def test_a_second_request_head_breaks_only_its_own_call() -> None:
    peer = Peer()
    peer.start(1)
    peer.start(3)
    peer.read()
    [ended] = peer.start(1)  # HEADERS again, without END_STREAM
    assert isinstance(ended, CallEnded)
    assert peer.read() == [(h2.RST_STREAM, 0, 1, struct.pack(">I", h2.PROTOCOL_ERROR))]
    [got] = peer.send(frame(h2.DATA, 0, 3, message(b"still here")))
    assert isinstance(got, MessageReceived) and got.payload == b"still here"


def test_oversized_metadata_refuses_only_its_call() -> None:
    """Above 16 KiB of request headers the call gets RESOURCE_EXHAUSTED before any handler;
    the headers are still decoded, so the connection's HPACK state stays in step."""
    peer = Peer()
    assert peer.start(1, headers=[*REQUEST, (b"authorization", b"Bearer " + b"y" * (20 << 10))]) == []
    trailers = next(p for kind, _, _, p in peer.read() if kind == h2.HEADERS)
    assert trailers["grpc-status"] == "8" and "metadata size exceeds hard limit" in trailers["grpc-message"]  # type: ignore[index]
    [started] = peer.start(3)
    assert isinstance(started, CallStarted) and ("user-agent", "test-client grpc-go/1.83.0") in started.fields


def test_response_headers_with_metadata_go_out_at_once_and_only_once() -> None:
    peer = Peer()
    peer.start()
    peer.read()
    assert peer.conn.respond(1, [(b"serverid", b"s1"), (b"servercount", b"2")])
    assert not peer.conn.respond(1, [])
    [(kind, flags, _, headers)] = peer.read()
    assert kind == h2.HEADERS and not flags & h2.END_STREAM
    assert headers == {":status": "200", "content-type": "application/grpc", "serverid": "s1", "servercount": "2"}
    peer.conn.send_message(1, b"x")
    assert [f[0] for f in peer.read()] == [h2.DATA]  # no second HEADERS


def test_unread_input_counts_only_calls_whose_handlers_have_not_read_yet() -> None:
    """A handler that reads is bounded by its stream window; counting its input too would let
    a few slow readers stop the whole connection."""
    peer = Peer(window=10)
    peer.start(1)
    peer.start(3)
    peer.send(frame(h2.DATA, 0, 1, message(b"a" * 100)) + frame(h2.DATA, 0, 3, message(b"b" * 50) + message(b"c")))
    assert peer.conn.unread == 166
    peer.conn.consumed(3, 55)  # call 3 read one message: none of its input counts any more
    assert peer.conn.unread == 105
    peer.send(frame(h2.DATA, 0, 3, message(b"d" * 1000)))
    assert peer.conn.unread == 105
    peer.conn.send_message(1, b"x" * 100)  # waits for the client's window...
    peer.conn.end_call(1, h2.OK)  # ...so call 1 stays in the connection, its input unread
    assert peer.conn.unread == 0 and peer.conn.calls == 2
    peer.send(frame(h2.DATA, 0, 1, message(b"late")))
    assert peer.conn.unread == 0
