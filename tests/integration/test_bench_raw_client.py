"""The benchmark's minimal raw HTTP/2 client (bench.raw_client) against a real server.

Its dial figures stand in for a compiled client's in the README, so it must speak to the
stock server path for real: a tunnel, an echo, CLOSE_REQ/CLOSE_RSP, and the server's own
refusal text when no agent is there.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.raw_client import RawClientError, RawTunnel
from tests.harness import Stack, echo_handler, endpoint


def _echo(uds: str, address: str, payload: bytes) -> tuple[int, bytes, int]:
    tunnel = RawTunnel(uds, address)
    tunnel.send(payload)
    got = b""
    while len(got) < len(payload):
        got += tunnel.receive()
    tunnel.close()
    return tunnel.conn_id, got, tunnel.sock.fileno()


async def test_raw_client_dials_echoes_and_closes(stack: Stack) -> None:
    await stack.add_agent()
    async with endpoint(echo_handler) as ep:
        for _ in range(3):
            conn_id, got, fileno = await asyncio.to_thread(_echo, stack.uds, ep.address, b"raw hello " * 100)
            assert conn_id != 0
            assert got == b"raw hello " * 100
            assert fileno == -1  # its socket is closed
        await stack.wait_idle()


async def test_raw_client_reports_the_servers_refusal(stack: Stack) -> None:
    with pytest.raises(RawClientError, match="No agent available"):
        await asyncio.to_thread(RawTunnel, stack.uds, "127.0.0.1:1")
    await stack.wait_idle()
