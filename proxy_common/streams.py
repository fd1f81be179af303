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


# Extra grpc channel arguments for every grpc channel of ours (agent, client library), for tuning on other
# machines: KONNECTIVITY_PY_GRPC_OPTIONS="grpc.http2.max_frame_size=65536,..." (integer values).
def _transport_options(environ: dict[str, str] | os._Environ[str]) -> list[tuple[str, int]]:
    options: list[tuple[str, int]] = []
    for item in filter(None, environ.get("KONNECTIVITY_PY_GRPC_OPTIONS", "").split(",")):
        name, _, value = item.partition("=")
        options.append((name.strip(), int(value)))
    return options


TRANSPORT_OPTIONS: list[tuple[str, int]] = _transport_options(os.environ)

# A writer that fell behind sends the DATA queued for one connection as one packet of at
# most this many payload bytes: never more than our agent's own reads, far under the 4 MiB a
# Go peer accepts. KONNECTIVITY_PY_COALESCE_BYTES=0 turns joining off (the benchmark uses
# it to play a Go agent).
COALESCE_BYTES = int(os.environ.get("KONNECTIVITY_PY_COALESCE_BYTES", 256 << 10))

# A small DATA with nothing queued behind it waits a few loop turns for its followers:
# with a peer sending 4 KiB packets this halved the client's CPU per GiB and added no
# measurable echo latency (bench figures in the README).
SMALL_BYTES = 64 << 10
SMALL_DATA_YIELDS = 3


async def next_outgoing(mailbox: Mailbox[Message], limit: int = COALESCE_BYTES) -> Message | None:
    """The next message to write from `mailbox`, or None once it is closed and empty.

    Consecutive DATA packets for the same connection that are already queued go out as one
    packet of at most `limit` payload bytes: every gRPC write costs tens of microseconds
    whatever its size, so a peer that sends small packets (a stock Go agent reads 4 KiB at
    a time) costs one write per batch instead of one per packet. Order is kept: only a run
    of DATA for one connection, with no error, is joined. A small DATA alone in the mailbox
    waits a few loop turns (never a timer) so that the packets its sender is reading right
    now can join it."""
    message = await mailbox.get()
    if type(message) is not Data or message.error or len(message.data) >= limit:
        return message
    conn_id = message.conn_id
    size = len(message.data)

    def joins(item: Message) -> bool:
        return type(item) is Data and item.conn_id == conn_id and not item.error and size + len(item.data) <= limit

    following = mailbox.get_nowait_if(joins)
    if following is None and size < SMALL_BYTES:
        for _ in range(SMALL_DATA_YIELDS):
            await asyncio.sleep(0)
        following = mailbox.get_nowait_if(joins)
    if following is None:
        return message
    parts = [message.data]
    while following is not None:
        parts.append(following.data)
        size += len(following.data)
        following = mailbox.get_nowait_if(joins)
    return Data(conn_id, b"".join(parts))


def split_data(message: Message, limit: int) -> list[Message]:
    """`message` as packets of at most `limit` payload bytes (DATA is cut, anything else is
    returned whole). A stock Go client queues 10 packets per connection and gives the tunnel
    up when its reader leaves one unread for 10 s, so smaller packets let a slow reader keep
    its tunnel."""
    if type(message) is not Data or len(message.data) <= limit or limit <= 0:
        return [message]
    view = memoryview(message.data)
    return [Data(message.conn_id, view[i : i + limit], message.error if i + limit >= len(view) else "")
            for i in range(0, len(view), limit)]


PROXY_METHOD = "/ProxyService/Proxy"
CONNECT_METHOD = "/AgentService/Connect"


class PacketStream(Protocol):
    async def send(self, message: Message) -> None: ...
    async def receive(self) -> Message: ...


class ServicerContext(Protocol):
    """What ServerStream needs of a call: grpc.aio's ServicerContext, or proxy-server's own."""

    async def read(self) -> Any: ...
    async def write(self, message: Any) -> None: ...


class ServerStream:
    """One stream seen from the servicer side."""

    def __init__(self, context: ServicerContext | grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def receive(self) -> Message:
        raw = await self._context.read()
        if raw is grpc.aio.EOF:
            raise TunnelClosed("peer closed its side")
        return wire.decode(raw)

    async def send(self, message: Message) -> None:
        await self._context.write(wire.encode(message))


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
