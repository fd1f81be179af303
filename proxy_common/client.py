"""Client library: open tunnels through a proxy-server, the Python konnectivity-client.

SHELL. Two modes, as the Go client has:

* single-use (`open_tunnel(address, uds_path=...)`): one gRPC connection per dial, closed
  when the tunnel ends, as released kube-apiservers do;
* reusable (`TunnelClient(...).dial(address)`): one long-lived gRPC connection, one new
  `Proxy` stream per dial, many at once.

A `Tunnel` offers `send()`/`receive()`/`aclose()`, and `open_streams()` turns it into an
asyncio (StreamReader, StreamWriter) pair. `connect_sync()` gives blocking callers a
real socket whose other end is pumped through a tunnel by a background thread.
Per stream the protocol is the reference client's: DIAL_REQ, wait for the DIAL_RSP with
our dial id (30 s backstop, then DIAL_CLS), DATA both ways, CLOSE_REQ and up to 10 s for
CLOSE_RSP, then the stream is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from proxy_common.errors import ProxyError, TunnelBroken, TunnelClosed
from proxy_common.mailbox import Mailbox, MailboxClosed
from proxy_common.messages import CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse
from proxy_common.streams import PROXY_METHOD, TRANSPORT_OPTIONS, ClientStream

DIAL_TIMEOUT_SECONDS = 30.0
CLOSE_TIMEOUT_SECONDS = 10.0
RECEIVE_BUFFER_BYTES = 4 << 20
MAX_MESSAGE_BYTES = 16 << 20
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    *TRANSPORT_OPTIONS,
]


class TunnelDialError(ProxyError):
    """The proxy could not open the connection; `str(exc)` is the server's or agent's text."""


def new_dial_id() -> int:
    return random.getrandbits(63) or 1


def uds_channel(uds_path: str) -> grpc.aio.Channel:
    """A gRPC channel to a proxy-server frontend Unix socket (no TLS, as kube-apiserver)."""
    return grpc.aio.insecure_channel(f"unix:{uds_path}", options=[*_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])


def tls_channel(target: str, ca: bytes, cert: bytes, key: bytes, server_name: str = "") -> grpc.aio.Channel:
    """A gRPC channel to a TCP+mTLS frontend."""
    options: list[tuple[str, Any]] = [*_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=options)


class Tunnel:
    """One dialed connection through the proxy."""

    def __init__(self, stream: ClientStream, address: str, *, owned_channel: grpc.aio.Channel | None = None) -> None:
        self.address = address
        self.conn_id = 0
        self._stream = stream
        self._channel = owned_channel
        self._inbox: Mailbox[bytes | memoryview] = Mailbox(RECEIVE_BUFFER_BYTES, len)
        self._closed_by_server = asyncio.Event()
        self.close_error = ""
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._closing = False

    # ----------------------------------------------------------------- dialing
    async def _dial(self, dial_id: int, timeout: float) -> None:
        # The reader starts at once and keeps running: cancelling a pending grpc.aio read
        # cancels the whole RPC, so a timeout must never interrupt a read.
        self._dialed: asyncio.Future[DialResponse] = asyncio.get_running_loop().create_future()
        try:
            await self._stream.send(DialRequest(dial_id=dial_id, address=self.address))
        except (TunnelClosed, TunnelBroken) as exc:
            raise TunnelDialError(f"tunnel closed: {exc}") from exc
        self._reader = asyncio.create_task(self._read_loop(dial_id), name=f"tunnel-reader dial_id={dial_id}")
        try:
            async with asyncio.timeout(timeout):
                response = await asyncio.shield(self._dialed)
        except TimeoutError:
            with contextlib.suppress(TunnelClosed, TunnelBroken):
                await self._stream.send(CloseDial(dial_id))
            raise TunnelDialError("dial timeout, backstop") from None
        if response.error:
            raise TunnelDialError(response.error)

    def _dial_finished(self, outcome: DialResponse | BaseException) -> None:
        if self._dialed.done():
            return
        if isinstance(outcome, BaseException):
            self._dialed.set_exception(outcome)
            self._dialed.exception()  # retrieved here; the dialer re-raises it
        else:
            self._dialed.set_result(outcome)

    async def _read_loop(self, dial_id: int) -> None:
        try:
            while not self._dialed.done():
                message = await self._stream.receive()
                if type(message) is DialResponse and message.dial_id == dial_id:
                    self.conn_id = message.conn_id  # before any DATA for it is read
                    self._dial_finished(message)
                    if message.error:
                        return
                elif type(message) is CloseDial and message.dial_id == dial_id:
                    self._dial_finished(TunnelDialError("dial closed"))
                    return
            while True:
                message = await self._stream.receive()
                if type(message) is Data:
                    if message.conn_id == self.conn_id and message.data and not self._closing:
                        await self._inbox.put(message.data)
                elif type(message) is CloseResponse and message.conn_id == self.conn_id:
                    self.close_error = message.error
                    return
        except (TunnelClosed, TunnelBroken) as exc:
            self._dial_finished(TunnelDialError(f"tunnel closed: {exc}"))
        except MailboxClosed:
            return
        finally:
            self._dial_finished(TunnelDialError("tunnel closed"))
            self._closed_by_server.set()
            self._inbox.close()

    # ------------------------------------------------------------------ using
    async def send(self, data: bytes) -> None:
        """Send bytes to the remote end. Raises TunnelClosed once the tunnel is over."""
        if self._closed_by_server.is_set() or self._closing:
            raise TunnelClosed("tunnel is closed")
        async with self._write_lock:
            await self._stream.send(Data(self.conn_id, data))

    async def receive(self) -> bytes:
        """The next chunk from the remote end; b"" once it has closed."""
        chunk = await self._inbox.get()
        return bytes(chunk) if chunk is not None else b""

    async def aclose(self) -> None:
        """CLOSE_REQ, wait (bounded) for CLOSE_RSP, then end the stream and its connection."""
        if self._closing:
            return
        self._closing = True
        self._inbox.clear()  # nobody reads any more: let data still arriving drain away
        try:
            if not self._closed_by_server.is_set():
                with contextlib.suppress(TunnelClosed, TunnelBroken):
                    async with self._write_lock:
                        await self._stream.send(CloseRequest(self.conn_id))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                        await self._closed_by_server.wait()
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        self._stream.cancel()
        self._inbox.close()
        self._inbox.clear()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> Tunnel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open_streams(self, limit: int = 1 << 20) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Wrap the tunnel as an asyncio (reader, writer) pair; closing the writer closes the tunnel."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport = _TunnelTransport(self, protocol)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer


async def _start(stream: ClientStream, address: str, channel: grpc.aio.Channel | None, timeout: float) -> Tunnel:
    tunnel = Tunnel(stream, address, owned_channel=channel)
    try:
        await tunnel._dial(new_dial_id(), timeout)
    except BaseException:
        await tunnel._teardown()
        raise
    return tunnel


async def open_tunnel(
    address: str, *, uds_path: str = "", channel: grpc.aio.Channel | None = None, timeout: float = DIAL_TIMEOUT_SECONDS
) -> Tunnel:
    """Single-use tunnel: a new gRPC connection for this one dial (or the given channel, owned)."""
    channel = channel or uds_channel(uds_path)
    stream = ClientStream(channel.stream_stream(PROXY_METHOD)())
    return await _start(stream, address, channel, timeout)


class TunnelClient:
    """Reusable mode: one gRPC connection, one Proxy stream per dial."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    @classmethod
    def over_uds(cls, uds_path: str) -> TunnelClient:
        return cls(uds_channel(uds_path))

    async def dial(self, address: str, *, timeout: float = DIAL_TIMEOUT_SECONDS) -> Tunnel:
        stream = ClientStream(self.channel.stream_stream(PROXY_METHOD)())
        return await _start(stream, address, None, timeout)

    async def aclose(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> TunnelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_connection(address: str, *, uds_path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Single-use tunnel as an asyncio stream pair (like asyncio.open_connection)."""
    tunnel = await open_tunnel(address, uds_path=uds_path)
    return await tunnel.open_streams()


class _TunnelTransport(asyncio.Transport):
    """An asyncio transport whose bytes travel through a Tunnel."""

    HIGH_WATER = 1 << 20
    MAX_SEND = 256 << 10

    def __init__(self, tunnel: Tunnel, protocol: asyncio.StreamReaderProtocol) -> None:
        super().__init__()
        self._tunnel = tunnel
        self._protocol = protocol
        self._buffer = bytearray()
        self._has_data = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._writing_paused = False
        protocol.connection_made(self)
        self._tasks = [
            asyncio.create_task(self._send_loop(), name=f"tunnel-transport-send conn_id={tunnel.conn_id}"),
            asyncio.create_task(self._receive_loop(), name=f"tunnel-transport-receive conn_id={tunnel.conn_id}"),
        ]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self._tunnel.address, "conn_id": self._tunnel.conn_id}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._buffer += data
        self._has_data.set()
        if not self._writing_paused and len(self._buffer) > self.HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._has_data.set()

    def abort(self) -> None:
        self._buffer.clear()
        self.close()

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._has_data.wait()
                if self._buffer:
                    chunk = bytes(self._buffer[: self.MAX_SEND])
                    del self._buffer[: len(chunk)]
                    await self._tunnel.send(chunk)
                    if self._writing_paused and len(self._buffer) <= self.HIGH_WATER // 4:
                        self._writing_paused = False
                        self._protocol.resume_writing()
                    continue
                self._has_data.clear()
                if self._closing:
                    break
        except (TunnelClosed, TunnelBroken):
            pass
        finally:
            self._closing = True
            await self._tunnel.aclose()
            self._tasks[1].cancel()
            self._protocol.connection_lost(None)

    async def _receive_loop(self) -> None:
        while chunk := await self._tunnel.receive():
            self._protocol.data_received(chunk)
            await self._reading.wait()
        self._protocol.eof_received()
        self.close()


def connect_sync(address: str, *, uds_path: str, timeout: float = DIAL_TIMEOUT_SECONDS) -> socket.socket:
    """Blocking callers: a connected socket whose peer is `address`, through the proxy.

    A daemon thread runs the tunnel; closing the returned socket ends it.
    """
    ours, theirs = socket.socketpair()
    ready: dict[str, BaseException | None] = {}
    started = threading.Event()

    async def pump() -> None:
        try:
            tunnel = await open_tunnel(address, uds_path=uds_path, timeout=timeout)
        except BaseException as exc:
            ready["error"] = exc
            started.set()
            return
        ready["error"] = None
        started.set()
        reader, writer = await asyncio.open_connection(sock=theirs)
        try:
            await _splice(reader, writer, tunnel)
        finally:
            writer.close()
            await tunnel.aclose()

    thread = threading.Thread(target=asyncio.run, args=(pump(),), name=f"tunnel {address}", daemon=True)
    thread.start()
    started.wait()
    if ready["error"] is not None:
        ours.close()
        theirs.close()
        raise ready["error"]
    return ours


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tunnel: Tunnel) -> None:
    async def up() -> None:
        while chunk := await reader.read(256 << 10):
            await tunnel.send(chunk)

    async def down() -> None:
        while chunk := await tunnel.receive():
            writer.write(chunk)
            await writer.drain()

    from proxy_common.tasks import race

    try:
        await race(up(), down())
    except* (TunnelClosed, TunnelBroken, ConnectionError):
        pass  # either side ended: the splice is over


@contextlib.asynccontextmanager
async def tunnel_to(address: str, *, uds_path: str) -> AsyncIterator[Tunnel]:
    """`async with tunnel_to(addr, uds_path=...) as t:` single-use tunnel, always closed."""
    tunnel = await open_tunnel(address, uds_path=uds_path)
    try:
        yield tunnel
    finally:
        await tunnel.aclose()
