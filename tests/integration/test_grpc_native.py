"""The frontend's own gRPC server (grpc_native over h2_core) against real grpc.aio clients and
raw sockets on a Unix socket: ordering, graceful stop, back-pressure, slow handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import hpack
import pytest

from proxy_server import grpc_native
from proxy_server import h2_core as h2
from proxy_server.grpc_native import NativeCall, NativeGrpcServer
from proxy_server.http_connect import bind_unix
from tests.harness import wait_for

pytestmark = pytest.mark.integration

CHUNK = b"x" * 16_000


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | kind, flags, stream_id) + payload


class Handlers:
    """/T/Flood writes until the client's window is full, then ends (its output still queued);
    /T/Echo answers each message; /T/Hi writes once."""

    def __init__(self) -> None:
        self.flood_ended = asyncio.Event()
        self.written = 0

    async def flood(self, _requests: Any, call: NativeCall) -> None:
        core = call._connection.core

        async def spam() -> None:
            for _ in range(5000):
                self.written += 1  # queued before write() first waits
                await call.write(CHUNK)

        spamming = asyncio.create_task(spam())
        await wait_for(lambda: core.pending(call.stream_id) > 0, what="output waiting for the client's window")
        spamming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await spamming
        self.flood_ended.set()  # returns with data queued behind the client's window

    async def echo(self, _requests: Any, call: NativeCall) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            await call.write(message)

    async def hi(self, _requests: Any, call: NativeCall) -> None:
        await call.write(b"hi")

    def table(self) -> dict[str, Any]:
        return {"/T/Flood": self.flood, "/T/Echo": self.echo, "/T/Hi": self.hi}


@pytest.fixture
async def served(short_tmp: Path) -> AsyncIterator[tuple[NativeGrpcServer, Handlers, str]]:
    handlers = Handlers()
    server = NativeGrpcServer(handlers.table(), max_message_bytes=16 << 20)
    path = str(short_tmp / "native.sock")
    await server.listen_unix(bind_unix(path, 0o600))
    try:
        yield server, handlers, path
    finally:
        await server.stop(0)
    assert not server.connections and not server.tasks


def channel(path: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{path}", options=[("grpc.use_local_subchannel_pool", 1)])


async def test_trailers_held_behind_output_do_not_garble_later_headers(
    served: tuple[NativeGrpcServer, Handlers, str],
) -> None:
    """HPACK blocks must reach the client in the order they were encoded: the trailers of a
    call whose output waits for a window are encoded only when they are sent."""
    _server, handlers, path = served
    async with channel(path) as ch:
        flood = ch.stream_stream("/T/Flood")()
        await asyncio.wait_for(handlers.flood_ended.wait(), 10)
        hi = ch.stream_stream("/T/Hi")()  # its headers are encoded while the flood's trailers wait
        assert await asyncio.wait_for(hi.read(), 5) == b"hi"
        assert await asyncio.wait_for(hi.code(), 5) is grpc.StatusCode.OK
        received = 0
        async for _ in flood:
            received += 1
        assert received == handlers.written
        assert await flood.code() is grpc.StatusCode.OK


async def test_graceful_stop_sends_queued_output_before_closing(served: tuple[NativeGrpcServer, Handlers, str]) -> None:
    server, handlers, path = served
    async with channel(path) as ch:
        flood = ch.stream_stream("/T/Flood")()
        await asyncio.wait_for(handlers.flood_ended.wait(), 10)
        stopping = asyncio.create_task(server.stop(10))
        await wait_for(lambda: server.stopping, what="stop under way")
        received = 0
        async for _ in flood:  # read only now: the queued output is still delivered
            received += 1
        assert received == handlers.written
        assert await flood.code() is grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 10)


async def test_a_client_that_never_reads_cannot_grow_the_servers_buffers(
    served: tuple[NativeGrpcServer, Handlers, str],
) -> None:
    """PINGs each queue an answer; unread answers make the server stop reading the client."""
    server, _handlers, path = served
    sock = socket.socket(socket.AF_UNIX)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(path)
    sock.setblocking(False)
    _reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        writer.write(h2.PREFACE + frame(h2.SETTINGS, 0, 0))
        burst = frame(h2.PING, 0, 0, b"12345678") * 10_000  # 170 KB
        sent = 0
        for _ in range(200):  # at most 34 MB, far more than the server's buffer
            writer.write(burst)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                break  # the server stopped reading us
            sent += len(burst)
        else:
            pytest.fail("the server kept reading a client that never reads")
        [connection] = server.connections
        assert connection.paused
        assert connection.transport is not None
        assert connection.transport.get_write_buffer_size() < 3 * grpc_native.WRITE_BUFFER_HIGH
        assert sent < 32 << 20
    finally:
        writer.transport.abort()
    await wait_for(lambda: not server.connections, what="connection gone")


async def test_a_connection_that_never_starts_http2_is_closed(
    served: tuple[NativeGrpcServer, Handlers, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    server, _handlers, path = served
    monkeypatch.setattr(grpc_native, "HANDSHAKE_SECONDS", 0.2)
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        with caplog.at_level(logging.WARNING, "proxy_server.grpc"):
            assert await asyncio.wait_for(reader.read(), 5)  # our SETTINGS, then EOF
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert "sent no HTTP/2 preface" in caplog.text
    finally:
        writer.close()
    await wait_for(lambda: not server.connections, what="connection gone")


async def test_unknown_methods_and_many_calls_on_one_connection(served: tuple[NativeGrpcServer, Handlers, str]) -> None:
    server, _handlers, path = served
    async with channel(path) as ch:
        unknown = ch.stream_stream("/T/Nope")()
        assert await unknown.code() is grpc.StatusCode.UNIMPLEMENTED

        async def one(index: int) -> None:
            call = ch.stream_stream("/T/Echo")()
            payload = index.to_bytes(4, "big") * (1 + index * 97)
            await call.write(payload)
            assert await call.read() == payload
            await call.done_writing()
            assert await call.code() is grpc.StatusCode.OK

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 30)
    # (grpc core closes a closed channel's socket late when the server shares its process,
    # so the connection itself is left to the fixture's stop.)
    await wait_for(lambda: not server.tasks, what="calls gone")


async def test_request_headers_never_reach_the_logs(
    served: tuple[NativeGrpcServer, Handlers, str], caplog: pytest.LogCaptureFixture,
) -> None:
    """hpack logs each decoded header at DEBUG; with everything at DEBUG, a secret in the
    request headers must still not be logged."""
    _server, _handlers, path = served
    with caplog.at_level(logging.DEBUG):
        async with channel(path) as ch:
            call = ch.stream_stream("/T/Hi")(metadata=(("authorization", "Bearer secret-token-value"),))
            assert await asyncio.wait_for(call.read(), 5) == b"hi"
    assert "secret-token-value" not in caplog.text


async def test_input_the_handlers_have_not_read_is_bounded_per_connection(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls whose handlers do not read yet (an agent port still checking a token) cannot make
    the server buffer more than about MAX_UNREAD_BYTES of a connection's input: reading stops,
    and resumes once the handlers catch up; nothing is lost."""
    monkeypatch.setattr(grpc_native, "MAX_UNREAD_BYTES", 256 << 10)
    go = asyncio.Event()

    async def late_reader(_requests: Any, call: NativeCall) -> None:
        await go.wait()
        total = 0
        while (message := await call.read()) is not grpc.aio.EOF:
            total += len(message)
        await call.write(str(total).encode())

    server = NativeGrpcServer({"/T/Late": late_reader}, max_message_bytes=1 << 20)
    path = str(short_tmp / "late.sock")
    await server.listen_unix(bind_unix(path, 0o600))
    try:
        async with channel(path) as ch:
            calls = [ch.stream_stream("/T/Late")() for _ in range(4)]

            async def send(call: Any) -> None:
                for _ in range(40):  # 640 KB per call, 2.5 MB in all: ten times the bound
                    await call.write(CHUNK)
                await call.done_writing()

            senders = asyncio.gather(*(send(call) for call in calls))
            await wait_for(lambda: any(c.input_full for c in server.connections), what="reading paused")
            [connection] = server.connections
            assert connection.core.unread <= (256 << 10) + (256 << 10)  # the bound plus one socket read
            go.set()
            await asyncio.wait_for(senders, 10)
            answers = [await asyncio.wait_for(call.read(), 10) for call in calls]
            assert answers == [str(40 * len(CHUNK)).encode()] * 4
            assert not connection.input_full and connection.core.unread == 0
    finally:
        await server.stop(0)


async def test_a_binary_header_that_is_not_base64_fails_only_its_call(served: tuple[NativeGrpcServer, Handlers, str]) -> None:
    _server, _handlers, path = served
    reader, writer = await asyncio.open_unix_connection(path)
    encoder, decoder = hpack.Encoder(), hpack.Decoder()
    request = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/T/Hi"), (b":authority", b"x"),
               (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    try:
        writer.write(h2.PREFACE + frame(h2.SETTINGS, 0, 0)
                     + frame(h2.HEADERS, h2.END_HEADERS, 1, encoder.encode([*request, (b"x-bin", b"abcde")]))
                     + frame(h2.HEADERS, h2.END_HEADERS, 3, encoder.encode(request)))
        statuses: dict[int, str] = {}
        hi = b""
        async with asyncio.timeout(5):
            while len(statuses) < 1 or not hi:
                head = await reader.readexactly(9)
                length_type, _flags, stream_id = struct.unpack(">IBI", head)
                payload = await reader.readexactly(length_type >> 8)
                if length_type & 0xFF == h2.HEADERS:
                    fields = dict(decoder.decode(payload, raw=True))
                    if b"grpc-status" in fields:
                        statuses[stream_id] = fields[b"grpc-status"].decode()
                elif length_type & 0xFF == h2.DATA and stream_id == 3:
                    hi += payload
        assert statuses[1] == "13"
        assert hi[5:] == b"hi"  # the other call on the connection was served
    finally:
        writer.close()


async def test_calls_that_read_slowly_never_stop_the_connection(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stalled readers (a tunnel whose client stopped reading) are bounded by their stream
    windows alone: however many there are, the connection's other calls go on."""
    monkeypatch.setattr(grpc_native, "MAX_UNREAD_BYTES", 256 << 10)
    release = asyncio.Event()

    async def stalls_after_one(_requests: Any, call: NativeCall) -> None:
        await call.read()
        await release.wait()
        while await call.read() is not grpc.aio.EOF:
            pass

    async def echo(_requests: Any, call: NativeCall) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            await call.write(message)

    server = NativeGrpcServer({"/T/Stall": stalls_after_one, "/T/Echo": echo}, max_message_bytes=1 << 20)
    path = str(short_tmp / "stall.sock")
    await server.listen_unix(bind_unix(path, 0o600))
    try:
        async with channel(path) as ch:
            stalled = [ch.stream_stream("/T/Stall")() for _ in range(4)]
            for call in stalled:
                for _ in range(40):  # 640 KB each, 2.5 MB in all: ten times the bound
                    await asyncio.wait_for(call.write(CHUNK), 5)
            [connection] = server.connections
            await wait_for(lambda: sum(s.recv_window for s in connection.core._streams.values()) < 4 << 20,
                           what="the stalled calls' input to arrive")
            assert not connection.input_full
            echo_call = ch.stream_stream("/T/Echo")()
            await echo_call.write(b"still here")
            assert await asyncio.wait_for(echo_call.read(), 5) == b"still here"
            release.set()
            for call in [*stalled, echo_call]:
                await call.done_writing()
    finally:
        await server.stop(0)
