"""The benchmark suite (issue 6): throughput, dial latency, concurrency, memory and CPU.

Starts real proxy-server, proxy-agent and endpoint processes on loopback and drives them
with the project's client library (gRPC mode) and with raw CONNECT sockets (HTTP-CONNECT
mode), measuring direct TCP to the same endpoint in the same run. Prints a table, writes
bench/results/bench.json and draws bench/results/bench.png. Every loop is bounded in count
and time; the whole run takes a few minutes on 2 cores.

Run: make bench   (or: python -m bench.run [--quick])
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import grpc_floor
from bench.common import (
    MiB,
    Processes,
    arun,
    bounded,
    cpu_seconds,
    machine,
    processes,
    rss_bytes,
    self_cpu_seconds,
    write_results,
)
from bench.raw_client import RawTunnel
from proxy_common.client import TunnelClient, open_tunnel

GiB = 1 << 30
# Held tunnels are measured this long after the last open: long enough for the server to
# retire the idle writers (frontend_service.IDLE_WRITER_SECONDS, at most twice that).
HOLD_SETTLE_SECONDS = 5.0
TIMEOUT = 120.0

Opener = Callable[[Processes], Awaitable[tuple[Any, Any]]]  # -> (reader-like, writer-like)


# ----------------------------------------------------------------- three ways in
class Conn:
    """A byte pipe: direct TCP, a gRPC tunnel, or an HTTP-CONNECT tunnel."""

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def receive(self) -> bytes:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class StreamConn(Conn):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> bytes:
        return await self.reader.read(1 << 20)

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


class TunnelConn(Conn):
    def __init__(self, tunnel: Any) -> None:
        self.tunnel = tunnel

    async def send(self, data: bytes) -> None:
        await self.tunnel.send(data)

    async def receive(self) -> bytes:
        return await self.tunnel.receive()

    async def aclose(self) -> None:
        await self.tunnel.aclose()


async def open_direct(running: Processes) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.endpoint_port, limit=1 << 20)
    return StreamConn(reader, writer)


async def open_grpc(running: Processes) -> Conn:
    return TunnelConn(await open_tunnel(running.endpoint_address, uds_path=running.uds))


async def open_http_connect(running: Processes) -> Conn:
    reader, writer = await asyncio.open_unix_connection(running.uds, limit=1 << 20)
    writer.write(f"CONNECT {running.endpoint_address} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"CONNECT refused: {head!r}")
    return StreamConn(reader, writer)


# ------------------------------------------------------------------ measurements
async def download(opener: Callable[[Processes], Awaitable[Conn]], running: Processes, size: int) -> float:
    conn = await opener(running)
    started = time.perf_counter()
    await conn.send(f"SOURCE {size}\n".encode())
    received = 0
    while received < size:
        chunk = await conn.receive()
        if not chunk:
            raise RuntimeError(f"short download: {received} of {size}")
        received += len(chunk)
    seconds = time.perf_counter() - started
    await conn.aclose()
    return size / seconds / MiB


async def upload(opener: Callable[[Processes], Awaitable[Conn]], running: Processes, size: int) -> float:
    conn = await opener(running)
    block = bytes(256 << 10)
    started = time.perf_counter()
    await conn.send(f"SINK {size}\n".encode())
    sent = 0
    while sent < size:
        await conn.send(block)
        sent += len(block)
    answer = await conn.receive()
    seconds = time.perf_counter() - started
    if not answer.startswith(b"OK"):
        raise RuntimeError(f"sink answered {answer!r}")
    await conn.aclose()
    return size / seconds / MiB


async def parallel_download(opener: Callable[[Processes], Awaitable[Conn]], running: Processes, size: int, n: int) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(download(opener, running, size) for _ in range(n)))
    return n * size / (time.perf_counter() - started) / MiB


async def echo_latencies(opener: Callable[[Processes], Awaitable[Conn]], running: Processes, count: int, budget: float) -> list[float]:
    payload = bytes(range(64))
    latencies: list[float] = []
    for _ in bounded(count, budget):
        started = time.perf_counter()
        conn = await opener(running)
        await conn.send(b"ECHO\n" + payload)
        got = b""
        while len(got) < len(payload):
            got += await conn.receive()
        await conn.aclose()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def raw_echo_latencies(running: Processes, count: int, budget: float) -> list[float]:
    """The same dial + echo + close with the minimal raw HTTP/2 client (bench.raw_client),
    whose own CPU is a fraction of grpc.aio's: closer to what a compiled client sees."""
    payload = bytes(range(64))
    latencies: list[float] = []
    for _ in bounded(count, budget):
        started = time.perf_counter()
        tunnel = RawTunnel(running.uds, running.endpoint_address)
        try:
            tunnel.send(b"ECHO\n" + payload)
            got = b""
            while len(got) < len(payload):
                got += tunnel.receive()
        finally:
            tunnel.close()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def raw_latency_suite(running: Processes, count: int) -> dict[str, Any]:
    raw_echo_latencies(running, 50, 10)  # warm-up
    with CpuMeter(running) as cpu:
        latencies = raw_echo_latencies(running, count, 60)
    return latency_figures(latencies, cpu)


def latency_figures(latencies: list[float], cpu: CpuMeter) -> dict[str, Any]:
    figures = percentiles(latencies)
    figures["cpu_s_per_1000_dials"] = {k: round(v * 1000 / len(latencies), 3) for k, v in cpu.used.items()}
    return figures


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": round(pick(0.50), 3), "p90_ms": round(pick(0.90), 3), "p99_ms": round(pick(0.99), 3), "n": len(values)}


class CpuMeter:
    """CPU seconds spent by server, agent and this (client) process during a block."""

    def __init__(self, running: Processes) -> None:
        self.running = running

    def __enter__(self) -> CpuMeter:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._now()
        self.used = {name: end[name] - self.start[name] for name in end}

    def _now(self) -> dict[str, float]:
        return {
            "server": cpu_seconds(self.running.server.pid),
            "agent": cpu_seconds(self.running.agent.pid),
            "client": self_cpu_seconds(),
        }


async def hold_tunnels(running: Processes, count: int, *, own_connections: bool = False) -> dict[str, float]:
    """Open `count` tunnels at once and keep them all open: over one reusable connection, or
    each over its own connection (single-use, as kube-apiserver and the Go client dial)."""
    baseline = {name: rss_bytes(pid) for name, pid in running.pids().items()}
    client = None if own_connections else TunnelClient.over_uds(running.uds)
    tunnels: list[Any] = []
    try:
        semaphore = asyncio.Semaphore(128 if own_connections else 256)

        async def one() -> Any:
            async with semaphore:
                if client is None:
                    tunnel = await open_tunnel(running.endpoint_address, uds_path=running.uds)
                else:
                    tunnel = await client.dial(running.endpoint_address)
                tunnels.append(tunnel)
                await tunnel.send(b"ECHO\n")

        started = time.perf_counter()
        async with asyncio.timeout(TIMEOUT):
            outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        seconds = time.perf_counter() - started
        succeeded = sum(1 for outcome in outcomes if not isinstance(outcome, BaseException))
        await asyncio.sleep(HOLD_SETTLE_SECONDS)
        held = {name: rss_bytes(pid) for name, pid in running.pids().items()}
        # every tunnel still works while all are open
        for tunnel in tunnels[:: max(1, len(tunnels) // 50)]:
            await tunnel.send(b"p")
            assert await tunnel.receive() == b"p"
    finally:
        await asyncio.gather(*(t.aclose() for t in tunnels))
        if client is not None:
            await client.aclose()
    return {
        "requested": count,
        "succeeded": succeeded,
        "opens_per_second": round(succeeded / seconds, 1),
        "server_rss_mib": round(held["server"] / MiB, 1),
        "agent_rss_mib": round(held["agent"] / MiB, 1),
        "server_rss_growth_mib": round((held["server"] - baseline["server"]) / MiB, 1),
        "agent_rss_growth_mib": round((held["agent"] - baseline["agent"]) / MiB, 1),
        "server_kib_per_tunnel": round((held["server"] - baseline["server"]) / 1024 / max(1, succeeded), 1),
    }


async def throughput_suite(running: Processes, opener: Callable[[Processes], Awaitable[Conn]], size: int) -> dict[str, Any]:
    await download(opener, running, 16 * MiB)  # warm-up
    with CpuMeter(running) as down_cpu:
        down = statistics.median([await download(opener, running, size) for _ in range(3)])
    with CpuMeter(running) as up_cpu:
        up = statistics.median([await upload(opener, running, size) for _ in range(3)])
    aggregate = await parallel_download(opener, running, size // 4, 8)
    moved_gib = 3 * size / GiB
    return {
        "download_mib_s": round(down, 1),
        "upload_mib_s": round(up, 1),
        "parallel8_mib_s": round(aggregate, 1),
        "cpu_s_per_gib_download": {k: round(v / moved_gib, 2) for k, v in down_cpu.used.items()},
        "cpu_s_per_gib_upload": {k: round(v / moved_gib, 2) for k, v in up_cpu.used.items()},
    }


async def latency_suite(running: Processes, opener: Callable[[Processes], Awaitable[Conn]], count: int) -> dict[str, Any]:
    await echo_latencies(opener, running, 50, 10)  # warm-up
    with CpuMeter(running) as cpu:
        latencies = await echo_latencies(opener, running, count, 60)
    return latency_figures(latencies, cpu)


def run(quick: bool) -> dict[str, Any]:
    size = (64 if quick else 256) * MiB
    dials = 300 if quick else 2000
    held = 500 if quick else 5000
    results: dict[str, Any] = {"machine": machine(), "bytes_per_transfer": size, "dials": dials}
    with processes() as running:
        results["direct_tcp"] = arun(_direct(running, size, dials))
        results["grpc"] = arun(_tunnelled(running, open_grpc, size, dials))
        results["grpc"]["echo_raw_client"] = raw_latency_suite(running, dials)
    # What a stock Go agent sends: 4 KiB DATA packets on the shared stream (no flow control).
    go_like_agent = {"agent_args": ("--read-chunk-bytes=4096", "--flow-control=false"),
                     "agent_env": {"KONNECTIVITY_PY_COALESCE_BYTES": "0"}}
    with processes(**go_like_agent) as running:
        results["grpc_4k_packets"] = arun(_small_packets(running, size))
    # Each hold starts fresh daemons, so RSS growth per tunnel is theirs alone.
    holds = {"held_tunnels": ({}, False), "held_tunnels_single_use": ({}, True),
             "held_tunnels_plain": (go_like_agent, False)}
    for name, (settings, own_connections) in holds.items():
        with processes(**settings) as running:
            results["grpc"][name] = arun(hold_tunnels(running, held, own_connections=own_connections))
    results["grpc_floor"] = arun(grpc_floor.measure(held, dials // 2))
    try:
        with processes(server_args=("--mode=http-connect",)) as running:
            results["http_connect"] = arun(_tunnelled(running, open_http_connect, size, dials, check=False))
    except Exception as exc:  # the HTTP-CONNECT frontend may be absent in older builds
        results["http_connect"] = {"error": str(exc)}
    return results


async def _direct(running: Processes, size: int, dials: int) -> dict[str, Any]:
    figures = await throughput_suite(running, open_direct, size)
    figures["echo"] = await latency_suite(running, open_direct, dials)
    return figures


async def _small_packets(running: Processes, size: int) -> dict[str, Any]:
    await download(open_grpc, running, 16 * MiB)  # warm-up
    with CpuMeter(running) as cpu:
        rate = statistics.median([await download(open_grpc, running, size) for _ in range(3)])
    moved_gib = 3 * size / GiB
    return {
        "download_mib_s": round(rate, 1),
        "cpu_s_per_gib_download": {k: round(v / moved_gib, 2) for k, v in cpu.used.items()},
        "server_us_per_packet": round(cpu.used["server"] / (3 * size / 4096) * 1e6, 2),
    }


async def _tunnelled(running: Processes, opener: Callable[[Processes], Awaitable[Conn]], size: int, dials: int, check: bool = True) -> dict[str, Any]:
    if not check:
        await opener(running)  # fails fast if the mode is unavailable
    figures = await throughput_suite(running, opener, size)
    figures["echo"] = await latency_suite(running, opener, dials)
    return figures


def report(results: dict[str, Any]) -> str:
    direct = results["direct_tcp"]
    lines = [f"machine: {results['machine']}", "", f"{'':22}{'direct TCP':>14}{'gRPC':>14}{'HTTP-CONNECT':>14}"]
    modes = [direct, results["grpc"], results.get("http_connect", {})]

    def row(label: str, get: Callable[[dict[str, Any]], Any]) -> None:
        cells = []
        for figures in modes:
            try:
                cells.append(f"{get(figures):>14}")
            except (KeyError, TypeError):
                cells.append(f"{'-':>14}")
        lines.append(f"{label:22}" + "".join(cells))

    row("download MiB/s", lambda f: f["download_mib_s"])
    row("upload MiB/s", lambda f: f["upload_mib_s"])
    row("8 parallel MiB/s", lambda f: f["parallel8_mib_s"])
    row("echo p50 ms", lambda f: f["echo"]["p50_ms"])
    row("echo p90 ms", lambda f: f["echo"]["p90_ms"])
    row("echo p99 ms", lambda f: f["echo"]["p99_ms"])
    row("echo p50 ms, raw client", lambda f: f["echo_raw_client"]["p50_ms"])
    row("echo p99 ms, raw client", lambda f: f["echo_raw_client"]["p99_ms"])
    row("server CPU s/GiB down", lambda f: f["cpu_s_per_gib_download"]["server"])
    row("agent CPU s/GiB down", lambda f: f["cpu_s_per_gib_download"]["agent"])
    row("client CPU s/GiB down", lambda f: f["cpu_s_per_gib_download"]["client"])
    row("server CPU s/GiB up", lambda f: f["cpu_s_per_gib_upload"]["server"])
    row("agent CPU s/GiB up", lambda f: f["cpu_s_per_gib_upload"]["agent"])
    row("server CPU s/1k dials", lambda f: f["echo"]["cpu_s_per_1000_dials"]["server"])
    row("agent CPU s/1k dials", lambda f: f["echo"]["cpu_s_per_1000_dials"]["agent"])
    row("client CPU s/1k dials", lambda f: f["echo"]["cpu_s_per_1000_dials"]["client"])
    row("client CPU s/1k, raw", lambda f: f["echo_raw_client"]["cpu_s_per_1000_dials"]["client"])
    small = results["grpc_4k_packets"]
    lines += ["", f"agent sending 4 KiB packets (as the Go agent does), plain protocol: download "
                  f"{small['download_mib_s']} MiB/s, server {small['cpu_s_per_gib_download']['server']} CPU s/GiB "
                  f"({small['server_us_per_packet']} us per packet), agent {small['cpu_s_per_gib_download']['agent']} CPU s/GiB"]
    def held_line(label: str, held: dict[str, Any]) -> str:
        return (f"{label}: {held['succeeded']}/{held['requested']} open at {held['opens_per_second']}/s, "
                f"server RSS {held['server_rss_mib']} MiB ({held.get('server_kib_per_tunnel', '-')} KiB per tunnel), "
                f"agent RSS {held['agent_rss_mib']} MiB")

    lines += ["", held_line("held tunnels, one reusable connection", results["grpc"]["held_tunnels"]),
              held_line("held tunnels, one connection each (as kube-apiserver dials)", results["grpc"]["held_tunnels_single_use"]),
              held_line("held tunnels, plain protocol, one reusable connection", results["grpc"]["held_tunnels_plain"])]
    floor = results["grpc_floor"]
    lines += [f"grpc.aio for comparison (a bare grpc.aio echo server, same run): {floor['held_one_connection']['kib_per_stream']} KiB "
              f"per held stream on one connection, {floor['held_own_connections']['kib_per_stream']} KiB with a connection "
              f"each; a single-use dial with {grpc_floor.ROUND_TRIPS} round trips: p50 {floor['dial']['p50_ms']} ms, "
              f"server {floor['dial']['server_cpu_ms_per_dial']} CPU ms"]
    grpc = results["grpc"]
    lines.append(f"ratios vs direct TCP: gRPC download {grpc['download_mib_s'] / direct['download_mib_s']:.3f}, "
                 f"upload {grpc['upload_mib_s'] / direct['upload_mib_s']:.3f}")
    return "\n".join(lines)


COLORS = {"direct TCP": "tab:blue", "gRPC": "tab:orange", "gRPC, raw client": "tab:red", "HTTP-CONNECT": "tab:green"}


def chart(results: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [("direct TCP", results["direct_tcp"]), ("gRPC", results["grpc"])]
    if "download_mib_s" in results.get("http_connect", {}):
        modes.append(("HTTP-CONNECT", results["http_connect"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    metrics = ["download_mib_s", "upload_mib_s", "parallel8_mib_s"]
    width = 0.8 / len(modes)
    for index, (name, figures) in enumerate(modes):
        xs = [i + index * width for i in range(len(metrics))]
        left.bar(xs, [figures[m] for m in metrics], width, label=name, color=COLORS[name])
    latency_modes = [(name, figures["echo"]) for name, figures in modes]
    latency_modes.insert(2, ("gRPC, raw client", results["grpc"]["echo_raw_client"]))
    latency_width = 0.8 / len(latency_modes)
    for index, (name, echo) in enumerate(latency_modes):
        xs = [i + index * latency_width for i in range(3)]
        right.bar(xs, [echo[p] for p in ("p50_ms", "p90_ms", "p99_ms")], latency_width, label=name, color=COLORS[name])
    left.set_xticks([i + width for i in range(len(metrics))], ["download", "upload", "8 parallel"])
    left.set_ylabel("MiB/s (log)")
    left.set_yscale("log")
    left.legend()
    right.set_xticks([i + 0.4 - latency_width / 2 for i in range(3)], ["p50", "p90", "p99"])
    right.set_ylabel("open + 64 B echo + close, ms")
    right.legend()
    fig.suptitle("konnectivity-py on " + str(results["machine"]["cpus"]) + " cores")
    fig.tight_layout()
    from bench.common import RESULTS

    path = RESULTS / "bench.png"
    fig.savefig(path, dpi=90)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and counts (about a minute)")
    options = parser.parse_args()
    started = time.monotonic()
    results = run(options.quick)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    print(report(results))
    path = write_results("bench", results)
    print(f"\nwritten {path} and {chart(results)} in {results['wall_seconds']} s")


if __name__ == "__main__":
    main()
