"""A small HTTP/1.1 client on h11 for the health and admin listeners (real sockets)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


async def read_reply(conn: h11.Connection, reader: asyncio.StreamReader) -> Reply:
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(1 << 16))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {name.decode().lower(): value.decode() for name, value in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return Reply(status, headers, body)


async def get(
    port: int, target: str, *, method: str = "GET", host: str | None = None, address: str = "127.0.0.1",
    timeout: float = 5.0,
) -> Reply:
    """One request on a fresh connection, closed afterwards."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(address, port)
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [("Host", host if host is not None else f"{address}:{port}"), ("Connection", "close")]
            writer.write(conn.send(h11.Request(method=method, target=target, headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return await read_reply(conn, reader)
        finally:
            writer.close()
            await writer.wait_closed()


async def wait_status(port: int, target: str, status: int, *, timeout: float = 20.0) -> Reply:
    """Poll until `target` answers `status` (a readiness probe's view), or fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Reply | str = "no answer"
    while loop.time() < deadline:
        try:
            last = await get(port, target, timeout=max(0.1, deadline - loop.time()))
        except OSError as exc:
            last = repr(exc)
        else:
            if last.status == status:
                return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {target} to answer {status}; last: {last}")


async def wait_text(port: int, target: str, text: str, *, timeout: float = 10.0) -> Reply:
    """Poll until `target`'s body contains `text` (e.g. a metric sample), or fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text not in (reply := await get(port, target)).text:
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {target} to show {text!r}")
        await asyncio.sleep(0.05)
    return reply
