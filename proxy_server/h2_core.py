"""The server side of one HTTP/2 connection carrying gRPC calls: a state machine, no I/O.

PURE. Bytes from the client go in (`receive`), events come out (a call started, a message
arrived, the client half-closed or reset a call, a call's queued output drained) and the
bytes to write pile up for `data_to_send`. The shell (`grpc_native`) runs the handlers.

Only what a gRPC server needs, after RFC 9113 and the gRPC-over-HTTP/2 spec:
* frames: DATA, HEADERS + CONTINUATION, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE
  (PRIORITY and unknown types are ignored; PUSH_PROMISE from a client is an error);
* HPACK through the `hpack` package;
* flow control both ways. Toward the client, output waits for its windows. From the client,
  a call's window is given back as the handler reads its messages, so a call whose handler
  is slow holds at most STREAM_WINDOW bytes and never stops the connection's other calls;
  the connection's window is given back as data arrives;
* gRPC length-prefixed messages, with a size limit; compressed messages are refused.

Why not grpcio here: a held gRPC stream costs grpc.aio about 23 KiB of server memory, a
state machine of our own about 1 KiB (bench/README.md has the figures).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

import hpack

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

# gRPC status codes used here.
OK, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 0, 2, 4, 8, 12, 13, 14

DEFAULT_WINDOW: Final = 65_535
MAX_WINDOW: Final = (1 << 31) - 1
DEFAULT_FRAME_SIZE: Final = 16_384
STREAM_WINDOW: Final = 1 << 20  # what one call may have in flight toward us
CONNECTION_WINDOW: Final = 16 << 20
# Request headers above MAX_HEADER_LIST_BYTES (decoded, counted as HPACK does) refuse their
# call with RESOURCE_EXHAUSTED before any handler runs, as grpc's hard metadata limit does.
# Up to MAX_HEADER_BLOCK_BYTES they are still decoded (the HPACK table must stay in step);
# above that the connection ends.
MAX_HEADER_LIST_BYTES: Final = 16 << 10
MAX_HEADER_BLOCK_BYTES: Final = 2 << 20

_FRAME_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")


class H2Error(Exception):
    """The client broke the protocol: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code


# Events (slotted, not frozen: one is made per message on the hot path).
@dataclass(slots=True)
class CallStarted:
    stream_id: int
    path: str
    timeout: float | None
    fields: list[tuple[str, str]]  # every header, in order


@dataclass(slots=True)
class MessageReceived:
    stream_id: int
    payload: bytes


@dataclass(slots=True)
class HalfClosed:
    """The client ended its side of the call (END_STREAM)."""

    stream_id: int


@dataclass(slots=True)
class CallEnded:
    """The call is gone from the connection before its handler finished: the client reset
    it, or it broke a rule (then the client was sent a status that says which)."""

    stream_id: int
    reason: str


@dataclass(slots=True)
class Drained:
    """Everything queued on this call has been written (it was waiting for a window)."""

    stream_id: int


@dataclass(slots=True)
class PingAcked:
    """The client answered our PING."""


@dataclass(slots=True)
class ConnectionClosing:
    """GOAWAY is queued (our error, or the client's GOAWAY): no new calls on this connection."""

    code: int
    detail: str


Event = CallStarted | MessageReceived | HalfClosed | CallEnded | Drained | PingAcked | ConnectionClosing

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float | None:
    """grpc-timeout: up to 8 digits and a unit; None if malformed (then it is ignored)."""
    if 2 <= len(value) <= 9 and value[:-1].isdigit() and value[-1] in _TIMEOUT_UNITS:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]
    return None


def _percent_encode(text: str) -> bytes:
    """grpc-message: printable ASCII except '%' as is, everything else as %XX of its UTF-8."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


class _Stream:
    __slots__ = ("extra", "have", "headers_sent", "id", "need", "parts", "pending", "pending_bytes", "reading", "recv_window",
                 "remote_closed", "send_window", "trailers", "unacked", "unread", "waiting")

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW  # what the client may still send us
        self.unacked = 0  # read by the handler, not yet given back
        self.parts: list[bytes] = []  # an incomplete message
        self.have = 0  # bytes in `parts`
        self.need = 0  # bytes that message needs in all (prefix included), 0 until its prefix is in
        self.pending: deque[memoryview] = deque()  # output waiting for a window
        self.pending_bytes = 0
        # Sent once `pending` is empty, and only then encoded: HPACK blocks must reach the
        # client in the order they were encoded.
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.extra = 0  # window granted beyond STREAM_WINDOW for a big message, not given back again
        self.unread = 0  # DATA bytes received before the handler's first read
        self.reading = False  # the handler has read: its stream window alone bounds its input
        self.headers_sent = False
        self.remote_closed = False
        self.waiting = False  # output waited for a window: say Drained when it is written


class ServerConnection:
    """One connection, server side. Not thread-safe; one owner drives it."""

    def __init__(self, *, max_message_bytes: int, max_streams: int = 100_000) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_streams = max_streams
        self._out: list[bytes | memoryview] = []
        self._inbox = b""  # bytes of an incomplete frame
        self._preface = True  # the client preface is still expected
        self._broken = False  # the client broke the protocol: input is ignored from then on
        self.max_frame_size = DEFAULT_FRAME_SIZE  # what we accept (we never advertise more)
        self._settings_seen = False
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        self._goaway_sent = False
        self._closing = False  # GOAWAY queued or received: no new calls
        self._send_window = DEFAULT_WINDOW  # connection window toward the client
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_frame_size = DEFAULT_FRAME_SIZE
        self._conn_unacked = 0
        self._blocked: dict[int, None] = {}  # streams waiting for the connection window, in order
        self._header_block: bytearray | None = None  # HEADERS waiting for CONTINUATION
        self._header_stream = 0
        self._header_end_stream = False
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = 2 * MAX_HEADER_BLOCK_BYTES
        self._encoder = hpack.Encoder()
        self._events: list[Event] = []
        # DATA bytes received on calls whose handlers have not read yet (say, an agent port
        # still checking a token): the shell stops reading the connection above a bound.
        # Calls that read are left out: their stream window bounds them, and a few slow
        # readers must not stop the connection's other calls.
        self.unread = 0

    # -- output --------------------------------------------------------------------------

    def initiate(self) -> None:
        """Our SETTINGS and the connection window: the first bytes we send."""
        settings = b"".join((
            _SETTING.pack(SETTINGS_MAX_CONCURRENT_STREAMS, self.max_streams),
            _SETTING.pack(SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            _SETTING.pack(SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_BYTES),
        ))
        self._frame(SETTINGS, 0, 0, settings)
        self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW))

    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> None:
        self._out.append(_FRAME_HEAD.pack(len(payload) << 8 | kind, flags, stream_id))
        if payload:
            self._out.append(payload)

    def _headers(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        size = self._peer_frame_size
        first, rest = block[:size], block[size:]
        flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
        self._frame(HEADERS, flags, stream_id, first)
        while rest:
            chunk, rest = rest[:size], rest[size:]
            self._frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, chunk)

    def _response_headers(self, stream: _Stream, metadata: list[tuple[bytes, bytes]] | None = None) -> None:
        if not stream.headers_sent:
            stream.headers_sent = True
            fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), *(metadata or ())]
            self._headers(stream.id, self._encoder.encode(fields), False)

    def respond(self, stream_id: int, metadata: list[tuple[bytes, bytes]]) -> bool:
        """Send the response headers now, with `metadata` (once per call; False if too late)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.headers_sent:
            return False
        self._response_headers(stream, metadata)
        return True

    def send_message(self, stream_id: int, payload: bytes) -> bool:
        """Queue one gRPC message; False if the call is gone. `pending(stream_id)` tells
        whether some of it waits for the client's window."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.trailers is not None:
            return False
        self._response_headers(stream)
        prefix = b"\x00" + len(payload).to_bytes(4, "big")
        if not stream.pending and len(payload) + 5 <= min(stream.send_window, self._send_window, self._peer_frame_size):
            size = len(payload) + 5  # the common case: one frame, windows open
            stream.send_window -= size
            self._send_window -= size
            self._out.append(_FRAME_HEAD.pack(size << 8 | DATA, 0, stream_id))
            self._out.append(prefix)
            if payload:
                self._out.append(payload)
            return True
        stream.pending.append(memoryview(prefix))
        if payload:
            stream.pending.append(memoryview(payload))
        stream.pending_bytes += len(payload) + 5
        self._flush(stream)
        if stream.pending:
            stream.waiting = True
        return True

    def pending(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.pending_bytes if stream is not None else 0

    def end_call(self, stream_id: int, status: int, message: str = "") -> None:
        """The handler is done: trailers go out after the queued messages. A client still
        sending is then told to stop (RST_STREAM NO_ERROR) and the call is forgotten."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.trailers is not None:
            return
        fields = [(b"grpc-status", str(status).encode())]
        if message:
            fields.append((b"grpc-message", _percent_encode(message)))
        if not stream.headers_sent:  # trailers-only response
            stream.headers_sent = True
            fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), *fields]
        stream.trailers = fields
        self.unread -= stream.unread  # its handler is done: what it left unread is not waited for
        stream.unread = 0
        self._flush(stream)

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        """Drop the call at once (the handler failed or was cancelled)."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._forget(stream)
            self._frame(RST_STREAM, 0, stream_id, _U32.pack(code))

    def _forget(self, stream: _Stream) -> None:
        del self._streams[stream.id]
        self._blocked.pop(stream.id, None)
        self.unread -= stream.unread
        stream.unread = 0

    def ping(self) -> None:
        self._frame(PING, 0, 0, b"\x00" * 8)

    def goaway(self, code: int = NO_ERROR, detail: str = "") -> None:
        """No new calls; those under way go on. Sent once."""
        if not self._goaway_sent:
            self._goaway_sent = True
            self._closing = True
            self._frame(GOAWAY, 0, 0, _GOAWAY.pack(self._last_stream_id, code) + detail.encode()[:256])

    @property
    def started(self) -> bool:
        """The client's preface and first SETTINGS have arrived."""
        return self._settings_seen

    @property
    def calls(self) -> int:
        return len(self._streams)

    def _flush(self, stream: _Stream) -> None:
        """Write what the windows allow of `stream`'s queue, then its trailers if it is empty."""
        pending = stream.pending
        while pending:
            room = min(stream.send_window, self._send_window, self._peer_frame_size)
            if room <= 0:
                if self._send_window <= 0 and stream.send_window > 0:
                    self._blocked[stream.id] = None
                return
            chunks: list[memoryview] = []
            size = 0
            while pending and size < room:
                head = pending[0]
                take = min(len(head), room - size)
                if take == len(head):
                    chunks.append(pending.popleft())
                else:
                    chunks.append(head[:take])
                    pending[0] = head[take:]
                size += take
            stream.send_window -= size
            self._send_window -= size
            stream.pending_bytes -= size
            self._out.append(_FRAME_HEAD.pack(size << 8 | DATA, 0, stream.id))
            self._out.extend(chunks)
        if stream.trailers is not None:
            self._headers(stream.id, self._encoder.encode(stream.trailers), True)
            self._forget(stream)
            if not stream.remote_closed:
                self._frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR))
        if stream.waiting:  # a writer may still wait on it, even when the call is over
            stream.waiting = False
            self._events.append(Drained(stream.id))

    def _flush_blocked(self) -> None:
        while self._blocked and self._send_window > 0:
            stream_id = next(iter(self._blocked))
            del self._blocked[stream_id]
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._flush(stream)

    # -- input ---------------------------------------------------------------------------

    def consumed(self, stream_id: int, size: int) -> None:
        """The handler read a message of `size` bytes (prefix included): give the window back."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not stream.reading:
            stream.reading = True
            self.unread -= stream.unread
            stream.unread = 0
        if stream.remote_closed:
            return
        if stream.extra:  # what _make_room granted is not given back a second time
            taken = min(stream.extra, size)
            stream.extra -= taken
            size -= taken
        stream.unacked += size
        if stream.unacked >= STREAM_WINDOW // 2:
            stream.recv_window += stream.unacked
            self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacked))
            stream.unacked = 0

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; returns what happened. A protocol error queues GOAWAY
        and ends with ConnectionClosing: the shell then writes what is queued and closes."""
        if self._broken:
            return []
        if self._inbox:
            data = self._inbox + data
        try:
            if self._preface:
                if len(data) < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    self._inbox = data
                    return []
                if not data.startswith(PREFACE):
                    raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self._preface = False
                data = data[len(PREFACE):]
            view = memoryview(data)
            end = len(data)
            pos = 0
            while end - pos >= 9:
                head = _FRAME_HEAD.unpack_from(view, pos)
                length = head[0] >> 8
                if length > self.max_frame_size:
                    raise H2Error(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                self._frame_received(head[0] & 0xFF, head[1], head[2] & MAX_WINDOW, view[pos + 9:pos + 9 + length])
                pos += 9 + length
            self._inbox = data[pos:] if pos < end else b""
        except H2Error as exc:
            self._inbox = b""
            self._fail(exc.code, str(exc))
        events, self._events = self._events, []
        return events

    def _fail(self, code: int, detail: str) -> None:
        self.goaway(code, detail)
        self._broken = True
        self._events.append(ConnectionClosing(code, detail))

    def _frame_received(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._header_block is not None and kind != CONTINUATION:
            raise H2Error(PROTOCOL_ERROR, "expected CONTINUATION")
        if not self._settings_seen and kind != SETTINGS:
            raise H2Error(PROTOCOL_ERROR, "first frame is not SETTINGS")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers_frame(flags, stream_id, payload)
        elif kind == CONTINUATION:
            if self._header_block is None or stream_id != self._header_stream:
                raise H2Error(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self._header_block += payload
            if len(self._header_block) > MAX_HEADER_BLOCK_BYTES:
                raise H2Error(ENHANCE_YOUR_CALM, "header block too large")
            if flags & END_HEADERS:
                block, self._header_block = bytes(self._header_block), None
                self._header_block_done(stream_id, block, self._header_end_stream)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == PING:
            if stream_id or len(payload) != 8:
                raise H2Error(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "bad PING")
            if flags & ACK:
                self._events.append(PingAcked())
            else:
                self._frame(PING, ACK, 0, bytes(payload))
        elif kind == RST_STREAM:
            if not stream_id or len(payload) != 4:
                raise H2Error(PROTOCOL_ERROR if not stream_id else FRAME_SIZE_ERROR, "bad RST_STREAM")
            if stream_id > self._last_stream_id:
                raise H2Error(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._forget(stream)
                self._events.append(CallEnded(stream_id, f"client reset the stream (code {_U32.unpack(payload)[0]})"))
        elif kind == GOAWAY:
            if stream_id or len(payload) < 8:
                raise H2Error(PROTOCOL_ERROR, "bad GOAWAY")
            if not self._closing:
                self._closing = True
                self._events.append(ConnectionClosing(_GOAWAY.unpack_from(payload)[1], "client sent GOAWAY"))
        elif kind == PRIORITY:
            if not stream_id or len(payload) != 5:
                raise H2Error(PROTOCOL_ERROR, "bad PRIORITY")
        elif kind == PUSH_PROMISE:
            raise H2Error(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # other frame types are ignored, as RFC 9113 asks

    @staticmethod
    def _unpad(flags: int, payload: memoryview) -> memoryview:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise H2Error(PROTOCOL_ERROR, "bad padding")
        return payload[1:len(payload) - payload[0]]

    def _data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if not stream_id:
            raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self._conn_unacked += size
        if self._conn_unacked >= CONNECTION_WINDOW // 2:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_unacked))
            self._conn_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise H2Error(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a call we ended or reset: its late data is dropped
        if stream.remote_closed:
            self._stream_error(stream, STREAM_CLOSED, "DATA after END_STREAM")
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            self._stream_error(stream, FLOW_CONTROL_ERROR, "client overran the stream window")
            return
        if not stream.reading and stream.trailers is None:
            stream.unread += size
            self.unread += size
        data = self._unpad(flags, payload)
        if len(data) != size:
            self.consumed(stream_id, size - len(data))  # padding is never read by the handler
        if data:
            self._messages(stream, data)
        if flags & END_STREAM and stream_id in self._streams:
            self._half_close(stream)

    def _messages(self, stream: _Stream, data: memoryview) -> None:
        """Cut gRPC messages out of `data`; an incomplete one is kept in `stream.parts`."""
        if stream.parts:
            stream.parts.append(bytes(data))
            stream.have += len(data)
            if stream.need == 0:
                if stream.have < 5:
                    return
                joined = b"".join(stream.parts)
                stream.parts = [joined]
                if not self._prefix_ok(stream, joined):
                    return
            if stream.have < stream.need:
                self._make_room(stream)
                return
            data = memoryview(b"".join(stream.parts))
            stream.parts = []
            stream.have = 0
            stream.need = 0
        pos, end = 0, len(data)
        while end - pos >= 5:
            if not self._prefix_ok(stream, data[pos:pos + 5]):
                return
            stop = pos + stream.need
            if stop > end:
                break
            stream.need = 0
            self._events.append(MessageReceived(stream.id, bytes(data[pos + 5:stop])))
            pos = stop
        else:
            stream.need = 0
        if pos < end:
            stream.parts.append(bytes(data[pos:]))
            stream.have = end - pos
            if stream.need:
                self._make_room(stream)

    def _make_room(self, stream: _Stream) -> None:
        """A message bigger than the window would never arrive (its bytes are given back
        when it is read): open the window enough for the rest of it. The grant is kept back
        from what reading gives back, so the window returns to STREAM_WINDOW."""
        short = stream.need - stream.have - stream.recv_window
        if short > 0:
            stream.recv_window += short
            stream.extra += short
            self._frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(short))

    def _prefix_ok(self, stream: _Stream, prefix: bytes | memoryview) -> bool:
        if prefix[0]:
            self._refuse(stream, INTERNAL, "compressed message, but no grpc-encoding was agreed")
            return False
        size = int.from_bytes(prefix[1:5], "big")
        if size > self.max_message_bytes:
            self._refuse(stream, RESOURCE_EXHAUSTED,
                         f"received message larger than max ({size} vs. {self.max_message_bytes})")
            return False
        stream.need = size + 5
        return True

    def _refuse(self, stream: _Stream, status: int, message: str) -> None:
        """End a call the client broke at the gRPC level: status to the client, the handler
        cancelled. A call with output still queued (perhaps half a message out, perhaps its
        trailers) cannot get a clean status any more: it is reset instead."""
        stream.parts = []
        stream.have = 0
        if stream.pending or stream.trailers is not None:
            self.reset(stream.id, CANCEL)
        else:
            self.end_call(stream.id, status, message)
        self._events.append(CallEnded(stream.id, message))

    def _stream_error(self, stream: _Stream, code: int, detail: str) -> None:
        self.reset(stream.id, code)
        self._events.append(CallEnded(stream.id, detail))

    def _half_close(self, stream: _Stream) -> None:
        stream.remote_closed = True
        if stream.parts:
            self._refuse(stream, INTERNAL, "the stream ended inside a message")
            return
        self._events.append(HalfClosed(stream.id))

    def _headers_frame(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if not stream_id or not stream_id & 1:
            raise H2Error(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise H2Error(FRAME_SIZE_ERROR, "bad HEADERS priority")
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block_done(stream_id, bytes(block), bool(flags & END_STREAM))
        else:
            self._header_block = bytearray(block)
            self._header_stream = stream_id
            self._header_end_stream = bool(flags & END_STREAM)

    def _header_block_done(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        try:
            fields = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            # The decoder stopped part way, so its table can no longer be trusted.
            raise H2Error(ENHANCE_YOUR_CALM, "request headers far too large") from exc
        except hpack.HPACKError as exc:
            raise H2Error(COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client
            if not end_stream:
                self._stream_error(stream, PROTOCOL_ERROR, "second HEADERS without END_STREAM")
            elif stream.remote_closed:
                self._stream_error(stream, STREAM_CLOSED, "HEADERS after END_STREAM")
            else:
                self._half_close(stream)
            return
        if stream_id <= self._last_stream_id:
            return  # trailers of a call we already ended
        self._last_stream_id = stream_id
        if self._closing:
            self._frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM))
            return
        if len(self._streams) >= self.max_streams:
            self._frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM))
            return
        stream = _Stream(stream_id, self._peer_initial_window)
        self._streams[stream_id] = stream
        size = sum(len(name) + len(value) + 32 for name, value in fields)
        if size > MAX_HEADER_LIST_BYTES:
            self.end_call(stream_id, RESOURCE_EXHAUSTED,
                          f"received metadata size exceeds hard limit ({size} vs. {MAX_HEADER_LIST_BYTES})")
            return
        decoded = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in fields]
        headers = dict(decoded)
        problem = self._check_request(headers)
        if problem:
            self.end_call(stream_id, *problem)
            return
        timeout = parse_timeout(headers["grpc-timeout"]) if "grpc-timeout" in headers else None
        self._events.append(CallStarted(stream_id, headers[":path"], timeout, decoded))
        if end_stream:
            self._half_close(stream)

    @staticmethod
    def _check_request(headers: dict[str, str]) -> tuple[int, str] | None:
        if headers.get(":method") != "POST" or ":path" not in headers:
            return INTERNAL, "not a gRPC request (method must be POST with a :path)"
        content_type = headers.get("content-type", "")
        if not (content_type == "application/grpc" or content_type.startswith(("application/grpc+", "application/grpc;"))):
            return INTERNAL, f"not a gRPC request (content-type {content_type!r})"
        encoding = headers.get("grpc-encoding", "identity")
        if encoding != "identity":
            return UNIMPLEMENTED, f"grpc-encoding {encoding} is not supported (identity only)"
        return None

    def _window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if stream_id == 0:
            if not increment:
                raise H2Error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise H2Error(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._flush_blocked()
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise H2Error(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if not increment:
            self._stream_error(stream, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream, FLOW_CONTROL_ERROR, "stream window above 2^31-1")
            return
        if stream.pending or stream.trailers is not None:
            self._flush(stream)

    def _settings(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2Error(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2Error(FRAME_SIZE_ERROR, "bad SETTINGS length")
        self._settings_seen = True
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2Error(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2Error(FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= (1 << 24) - 1:
                    raise H2Error(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self._peer_frame_size = value
            elif key == SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = min(value, 4096)
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise H2Error(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
        self._frame(SETTINGS, ACK, 0)
        for stream in list(self._streams.values()):
            if stream.pending and stream.send_window > 0:
                self._flush(stream)
