"""A small loopback TCP load balancer for HA tests: one address in front of several servers.

Each accepted connection goes to the next backend port in turn (round robin) and bytes are
pumped both ways until either side closes, like a Kubernetes Service or an L4 balancer in
front of the proxy servers. TLS passes through untouched, so agents verify the servers.
Connections are counted per backend; a backend that refuses is counted and the client's
connection is closed at once (as a balancer without health checks would). Every task is
owned and cancelled by `aclose()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class Balancer:
    def __init__(self, backends: list[int]) -> None:
        self.backends = list(backends)
        self.port = 0
        self.accepted = 0
        self.forwarded: collections.Counter[int] = collections.Counter()
        self.refused: collections.Counter[int] = collections.Counter()
        self._next = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.accepted += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            if not self.backends:
                return
            port = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                up_reader, upstream = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                self.refused[port] += 1
                return
            self.forwarded[port] += 1
            async with asyncio.TaskGroup() as group:
                group.create_task(_pump(reader, upstream))
                group.create_task(_pump(up_reader, writer))
        except* (ConnectionError, OSError):
            pass
        except* asyncio.CancelledError:
            # Only aclose() cancels these; ending quietly keeps asyncio's stream callback from
            # logging the cancellation as an error.
            pass
        finally:
            writer.transport.abort()
            if upstream is not None:
                upstream.transport.abort()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until EOF, then close the other side completely (a peer's FIN ends the pair)."""
    try:
        while data := await source.read(1 << 16):
            sink.write(data)
            await sink.drain()
    finally:
        sink.transport.abort()


@contextlib.asynccontextmanager
async def balancer(backends: list[int]) -> AsyncIterator[Balancer]:
    running = await Balancer(backends).start()
    try:
        yield running
    finally:
        await running.aclose()
