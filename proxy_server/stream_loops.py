"""The reader and writer loops the gRPC servicers share.

SHELL. The agent-facing servicers run one reader and one writer per stream (under
`tasks.race`): the reader hands every packet to the switchboard until the peer ends its
side, the writer drains the stream's mailbox until it is closed or the peer has gone. (The
client-facing Proxy stream keeps no idle writer: see frontend_service.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proxy_common.errors import TunnelClosed
from proxy_common.messages import Message
from proxy_common.streams import ServerStream, next_outgoing
from proxy_server.grpc_native import CallGone
from proxy_server.metrics import ServerMetrics
from proxy_server.switchboard import Link


async def read_into(stream: ServerStream, deliver: Callable[[Message], Awaitable[None]]) -> None:
    """Give each packet read from `stream` to `deliver`, until the peer ends its side
    (MalformedPacket and cancellation pass through)."""
    while True:
        try:
            message = await stream.receive()
        except TunnelClosed:
            return
        await deliver(message)


async def write_to_agent(stream: ServerStream, link: Link, metrics: ServerMetrics) -> None:
    """Send what is queued for an agent stream until its mailbox is closed and empty."""
    while (message := await next_outgoing(link.mailbox)) is not None:
        try:
            await stream.send(message)
        except CallGone:  # the agent went away while we wrote: nothing left to write to
            metrics.send_failed("to_agent", message)
            return
