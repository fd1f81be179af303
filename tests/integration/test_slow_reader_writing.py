"""A slow reader that keeps writing gets every byte: the server leaves ending a Proxy stream to
its client, as the Go server does (ending it at once after CLOSE_RSP made grpc reset the stream
under the still-writing client, whose grpc.aio call then failed with unread data)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import pytest

from proxy_common.client import open_tunnel
from tests.harness import Stack, endpoint

pytestmark = pytest.mark.integration
SIZE = 8 << 20


async def test_a_client_writing_while_it_reads_slowly_gets_every_byte(stack: Stack) -> None:
    await stack.add_agent(flow_control=False)
    payload = hashlib.shake_256(b"x").digest(SIZE)

    async def half_closing_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def sink() -> None:
            while await reader.read(1 << 16):
                pass

        reading = asyncio.ensure_future(sink())
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reading, 30)

    async with endpoint(half_closing_source) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)

        async def trickle() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await tunnel.send(b"ping")
                    await asyncio.sleep(0.2)

        writing = asyncio.create_task(trickle())
        got = bytearray()
        try:
            async with asyncio.timeout(30):
                while chunk := await tunnel.receive():
                    got += chunk
                    await asyncio.sleep(0.05 * len(chunk) / (128 << 10))  # about 2.5 MiB/s
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
            await tunnel.aclose()
    assert len(got) == SIZE and bytes(got) == payload, f"received {len(got)} of {SIZE} bytes"
