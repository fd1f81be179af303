"""What grpc.aio itself costs: a bare echo server, measured beside the proxy in one run.

The proxy-server's frontend ran on grpc.aio until it got its own HTTP/2 server
(proxy_server/grpc_native.py); a held grpc.aio stream cost more server memory than a whole
tunnel does now. For that comparison, this starts a bare grpc.aio server in its own
process: same Python, same grpcio, same runtime settings as the daemons (uvloop, malloc
arenas, grpc experiments), one stream-stream method that echoes each message and nothing else. It then
measures, on the same machine and in the same run as the proxy:

* RSS growth per held stream, each stream on its own connection (what kube-apiserver and
  the Go konnectivity-client do: one gRPC connection per dial) and all streams on one
  connection;
* server CPU and latency per single-use dial shaped like a tunnel's: connect, 3 message
  round trips (DIAL, DATA, CLOSE), half-close, EOF.

Run alone: python -m bench.grpc_floor [--held N] [--dials N]. `bench.run` includes it.
Serve only: python -m bench.grpc_floor serve <unix socket path> (prints "ready").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.common import MiB, arun, bounded, cpu_seconds, rss_bytes
from proxy_common import runtime

METHOD = "/ProxyService/Proxy"
TIMEOUT = 120.0
ROUND_TRIPS = 3  # a tunnel's DIAL, one DATA echo, CLOSE


async def _serve(uds: str) -> None:
    async def echo(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message)

    handler = grpc.method_handlers_generic_handler("ProxyService", {"Proxy": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([handler])
    server.add_insecure_port(f"unix:{uds}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


@contextlib.contextmanager
def bare_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with tempfile.TemporaryDirectory(prefix="kfloor-") as work:
        uds = str(Path(work) / "floor.sock")
        proc = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "serve", uds], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("bare grpc.aio server did not start")
            yield proc, uds
        finally:
            proc.kill()
            proc.wait(timeout=10)


def _channel(uds: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{uds}", options=[("grpc.use_local_subchannel_pool", 1)])


async def _round_trip(call: Any) -> None:
    await call.write(b"x" * 24)
    if await call.read() != b"x" * 24:
        raise RuntimeError("bare server answered something else")


async def held_streams(proc: subprocess.Popen[bytes], uds: str, count: int, *, own_connections: bool) -> dict[str, float]:
    """Open `count` streams, one round trip each, keep them all; RSS growth per stream."""
    baseline = rss_bytes(proc.pid)
    shared = None if own_connections else _channel(uds)
    channels: list[grpc.aio.Channel] = []
    calls: list[Any] = []
    semaphore = asyncio.Semaphore(128)

    async def one() -> None:
        async with semaphore:
            channel = shared or _channel(uds)
            channels.append(channel)
            call = channel.stream_stream(METHOD)()
            calls.append(call)
            await _round_trip(call)

    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(1.0)
        grown = rss_bytes(proc.pid) - baseline
    finally:
        for call in calls:
            call.cancel()
        for channel in [shared] if shared is not None else channels:
            await channel.close()
    return {"baseline_rss_mib": round(baseline / MiB, 1), "kib_per_stream": round(grown / 1024 / count, 1)}


async def dials(proc: subprocess.Popen[bytes], uds: str, count: int, budget: float) -> dict[str, float]:
    """Single-use dials shaped like a tunnel's; p50 latency and server CPU per dial."""
    latencies: list[float] = []
    cpu_before = cpu_seconds(proc.pid)
    for _ in bounded(count, budget):
        started = time.perf_counter()
        channel = _channel(uds)
        try:
            call = channel.stream_stream(METHOD)()
            for _ in range(ROUND_TRIPS):
                await _round_trip(call)
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise RuntimeError("bare server did not end the stream")
        finally:
            await channel.close()
        latencies.append((time.perf_counter() - started) * 1000)
    used = cpu_seconds(proc.pid) - cpu_before
    return {
        "p50_ms": round(statistics.median(latencies), 2),
        "server_cpu_ms_per_dial": round(used * 1000 / len(latencies), 3),
        "n": len(latencies),
    }


async def measure(held: int, dial_count: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with bare_server() as (proc, uds):
        await dials(proc, uds, 50, 10)  # warm-up
        results["dial"] = await dials(proc, uds, dial_count, 30)
    # A fresh server for each hold, so neither measures the other's leftovers.
    with bare_server() as (proc, uds):
        results["held_own_connections"] = await held_streams(proc, uds, held, own_connections=True)
    with bare_server() as (proc, uds):
        results["held_one_connection"] = await held_streams(proc, uds, held, own_connections=False)
    return results


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        runtime.limit_malloc_arenas()  # as the daemons do (bench/__init__ did the grpc settings)
        arun(_serve(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", type=int, default=2000, help="streams held open at once (default 2000)")
    parser.add_argument("--dials", type=int, default=1000, help="single-use dials (default 1000)")
    options = parser.parse_args()
    print(json.dumps(arun(measure(options.held, options.dials)), indent=2))


if __name__ == "__main__":
    main()
