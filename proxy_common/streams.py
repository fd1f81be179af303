"""gRPC stream adapters: the only place the data path touches grpc objects.

SHELL. Both adapters move serialized `Packet` bytes (the gRPC methods are registered with
no serializers) and convert with `wire`, and translate grpc's end-of-stream and errors into
`TunnelClosed` / `TunnelBroken`. Cancellation passes through untouched.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Protocol

import grpc
import grpc.aio

from proxy_common import wire
from proxy_common.errors import TunnelBroken, TunnelClosed
from proxy_common.mailbox import Mailbox
from proxy_common.messages import Data, Message


# Extra grpc channel arguments for every channel and server of ours, for tuning on other
# machines: KONNECTIVITY_PY_GRPC_OPTIONS="grpc.http2.max_frame_size=65536,..." (integer values).
# KONNECTIVITY_PY_FRAME=<bytes> is kept as a short form of grpc.http2.max_frame_size.
def _transport_options(environ: dict[str, str] | os._Environ[str]) -> list[tuple[str, int]]:
    options: list[tuple[str, int]] = []
    if "KONNECTIVITY_PY_FRAME" in environ:
        options.append(("grpc.http2.max_frame_size", int(environ["KONNECTIVITY_PY_FRAME"])))
    for item in filter(None, environ.get("KONNECTIVITY_PY_GRPC_OPTIONS", "").split(",")):
        name, _, value = item.partition("=")
        options.append((name.strip(), int(value)))
    return options


TRANSPORT_OPTIONS: list[tuple[str, int]] = _transport_options(os.environ)

# A writer that fell behind sends the DATA queued for one connection as one packet of at
# most this many payload bytes (well under grpc-go's 4 MiB default receive limit);
# KONNECTIVITY_PY_COALESCE_BYTES=0 turns joining off (the benchmark uses it to play a Go agent).
COALESCE_BYTES = int(os.environ.get("KONNECTIVITY_PY_COALESCE_BYTES", 512 << 10))


# A small DATA with nothing queued behind it waits a few loop turns for its followers:
# with a peer sending 4 KiB packets this halved the client's CPU per GiB and added no
# measurable echo latency (bench figures in the README).
SMALL_BYTES = 64 << 10
SMALL_DATA_YIELDS = 3


async def next_outgoing(mailbox: Mailbox[Message]) -> Message | None:
    """The next message to write from `mailbox`, or None once it is closed and empty.

    Consecutive DATA packets for the same connection that are already queued go out as one:
    every gRPC write costs tens of microseconds whatever its size, so a peer that sends
    small packets (a stock Go agent reads 4 KiB at a time) costs one write per batch
    instead of one per packet. Order is kept: only a run of DATA for one connection, with
    no error, is joined. A small DATA alone in the mailbox waits a few loop turns (never a
    timer) so that the packets its sender is reading right now can join it."""
    message = await mailbox.get()
    if type(message) is not Data or message.error or not COALESCE_BYTES:
        return message
    conn_id = message.conn_id

    def same_connection(item: Message) -> bool:
        return type(item) is Data and item.conn_id == conn_id and not item.error

    following = mailbox.get_nowait_if(same_connection)
    if following is None and len(message.data) < SMALL_BYTES:
        for _ in range(SMALL_DATA_YIELDS):
            await asyncio.sleep(0)
        following = mailbox.get_nowait_if(same_connection)
    if following is None:
        return message
    parts = [message.data, following.data]
    size = len(message.data) + len(following.data)
    while size < COALESCE_BYTES and (following := mailbox.get_nowait_if(same_connection)) is not None:
        parts.append(following.data)
        size += len(following.data)
    return Data(conn_id, b"".join(parts))


PROXY_METHOD = "/ProxyService/Proxy"
CONNECT_METHOD = "/AgentService/Connect"


class PacketStream(Protocol):
    async def send(self, message: Message) -> None: ...
    async def receive(self) -> Message: ...


class ServerStream:
    """One stream seen from the servicer side (a grpc.aio ServicerContext)."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def receive(self) -> Message:
        raw = await self._context.read()
        if raw is grpc.aio.EOF:
            raise TunnelClosed("peer closed its side")
        return wire.decode(raw)

    async def send(self, message: Message) -> None:
        await self._context.write(wire.encode(message))

    async def send_raw(self, raw: bytes) -> None:
        await self._context.write(raw)


class ClientStream:
    """One stream seen from the calling side (a grpc.aio StreamStreamCall)."""

    def __init__(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        self.call = call

    async def receive(self) -> Message:
        try:
            raw = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        if raw is grpc.aio.EOF:
            raise TunnelClosed("server ended the stream")
        return wire.decode(raw)

    async def send(self, message: Message) -> None:
        try:
            await self.call.write(wire.encode(message))
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:  # the call already finished
            raise TunnelClosed(str(exc)) from exc

    def cancel(self) -> None:
        self.call.cancel()


def _translate(exc: grpc.aio.AioRpcError) -> Exception:
    if exc.code() is grpc.StatusCode.CANCELLED:
        return TunnelClosed("stream cancelled")
    return TunnelBroken(exc.code().name, exc.details() or "")
