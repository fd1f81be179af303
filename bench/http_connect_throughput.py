"""Benchmark: tunneled throughput in HTTP-CONNECT mode, one connection, against direct TCP.

Real processes: proxy-server (--mode=http-connect), proxy-agent and the benchmark endpoint
(bench/endpoint.py), each its own process; this process is the client. For each frontend
(the Unix socket, then TCP with mutual TLS) it measures one connection's download
(endpoint -> client) and upload (client -> endpoint) in MiB/s, the best of `--rounds`,
and the same with a direct TCP connection to the endpoint in the same run, for the ratio.

Prints the figures and writes bench/results/http_connect_throughput.json.
Run: python -m bench.http_connect_throughput [--size-mib 256] [--rounds 3] [--budget 45s]
Self-contained (its endpoint is this module run with --endpoint), bounded in count and time:
all transfers share one time budget (default 45 s; a round that would start after it is
skipped, and at least one round per direction runs), so a run takes well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from proxy_common.certs import DemoPki, make_demo_pki

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
MiB = 1 << 20
STARTUP_TIMEOUT = 30.0
BLOCK = bytes(range(256)) * 4096  # 1 MiB
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def machine() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}


# ------------------------------------------------------------------- endpoint
async def serve_endpoint() -> None:
    """The endpoint process: `SOURCE n\\n` sends n bytes then closes; `SINK n\\n` reads n
    bytes, then answers `OK\\n`. Prints its port, serves until killed."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            command, size = (await reader.readline()).split()
            remaining = int(size)
            if command == b"SOURCE":
                view = memoryview(BLOCK)
                while remaining > 0:
                    writer.write(view[: min(len(BLOCK), remaining)])
                    remaining -= min(len(BLOCK), remaining)
                    await writer.drain()
            elif command == b"SINK":
                while remaining > 0 and (data := await reader.read(min(remaining, 4 * MiB))):
                    remaining -= len(data)
                writer.write(b"OK\n")
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=4 * MiB)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


@dataclass
class Frontend:
    kind: str
    uds: str
    port: int
    tls: ssl.SSLContext | None


def _python(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


@contextlib.contextmanager
def proxy(kind: str, work: Path, pki: DemoPki) -> Iterator[Frontend]:
    """proxy-server in http-connect mode on `kind` ("uds" or "tls") plus one proxy-agent."""
    agent_port, server_port = free_port(), free_port()
    uds = str(work / f"{kind}.sock")
    if kind == "uds":
        frontend = [f"--uds-name={uds}", "--server-port=0"]
    else:
        frontend = [
            "--server-bind-address=127.0.0.1",
            f"--server-port={server_port}",
            f"--server-cert={pki.server_cert}",
            f"--server-key={pki.server_key}",
            f"--server-ca-cert={pki.ca_cert}",
        ]
    server = _python(
        [
            "-m",
            "proxy_server",
            "--mode=http-connect",
            *frontend,
            "--agent-bind-address=127.0.0.1",
            f"--agent-port={agent_port}",
            f"--cluster-cert={pki.server_cert}",
            f"--cluster-key={pki.server_key}",
            "--server-id=bench-server",
            f"--health-port={free_port()}",
            f"--admin-port={free_port()}",
            "--health-bind-address=127.0.0.1",
            "-v=1",
        ],
        work / f"server-{kind}.log",
    )
    agent = _python(
        [
            "-m",
            "proxy_agent",
            "--proxy-server-host=127.0.0.1",
            f"--proxy-server-port={agent_port}",
            f"--ca-cert={pki.ca_cert}",
            "--agent-id=bench-agent",
            "--sync-interval=200ms",
            f"--health-server-port={free_port()}",
            f"--admin-server-port={free_port()}",
            "--health-server-host=127.0.0.1",
            "-v=1",
        ],
        work / f"agent-{kind}.log",
    )
    tls = None
    if kind == "tls":
        tls = ssl.create_default_context(cafile=str(pki.ca_cert))
        tls.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        tls.set_alpn_protocols(["http/1.1"])
    try:
        yield Frontend(kind, uds, server_port, tls)
    finally:
        for proc in (agent, server):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (agent, server):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def tunnel_opener(frontend: Frontend, endpoint: str) -> Opener:
    async def open_tunnel() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if frontend.kind == "uds":
            reader, writer = await asyncio.open_unix_connection(frontend.uds, limit=4 * MiB)
        else:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", frontend.port, ssl=frontend.tls, server_hostname="127.0.0.1", limit=4 * MiB
            )
        writer.write(f"CONNECT {endpoint} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            writer.close()
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
        return reader, writer

    return open_tunnel


def direct_opener(endpoint: str) -> Opener:
    host, port = endpoint.rsplit(":", 1)

    async def open_direct() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, int(port), limit=4 * MiB)

    return open_direct


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        async with asyncio.timeout(10):
            await writer.wait_closed()


async def download(opener: Opener, size: int) -> float:
    reader, writer = await opener()
    started = time.perf_counter()
    writer.write(f"SOURCE {size}\n".encode())
    received = 0
    while received < size and (chunk := await reader.read(4 * MiB)):
        received += len(chunk)
    seconds = time.perf_counter() - started
    await close(writer)
    assert received == size, f"received {received} of {size}"
    return size / seconds / MiB


async def upload(opener: Opener, size: int) -> float:
    reader, writer = await opener()
    started = time.perf_counter()
    writer.write(f"SINK {size}\n".encode())
    sent = 0
    view = memoryview(BLOCK)
    while sent < size:
        piece = view[: min(len(BLOCK), size - sent)]
        writer.write(piece)
        sent += len(piece)
        await writer.drain()
    assert await reader.readline() == b"OK\n"
    seconds = time.perf_counter() - started
    await close(writer)
    return size / seconds / MiB


async def wait_ready(opener: Opener, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until a tunnel opens (the agent has connected)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _reader, writer = await opener()
            await close(writer)
            return
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def best_of(rounds: int, opener: Opener, size: int, share: float) -> dict[str, float]:
    """The best of `rounds` downloads and uploads, within `share` seconds (one round at least,
    which may use up to twice the share before it is cut off)."""
    downs: list[float] = []
    ups: list[float] = []
    started = time.monotonic()
    async with asyncio.timeout(2 * share):
        for _ in range(rounds):
            if downs and time.monotonic() - started > share:
                break
            downs.append(await download(opener, size))
            ups.append(await upload(opener, size))
    return {"download_mib_s": round(max(downs), 1), "upload_mib_s": round(max(ups), 1), "rounds": len(downs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per transfer, in MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per direction; the best counts (default 3)")
    parser.add_argument("--budget", type=float, default=45.0, help="seconds for all transfers together (default 45)")
    parser.add_argument("--endpoint", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.endpoint:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_endpoint())
        return
    if options.size_mib <= 0 or options.rounds <= 0 or options.budget <= 0:
        parser.error("--size-mib, --rounds and --budget must be positive")
    size = options.size_mib * MiB
    share = options.budget / 3  # direct TCP, the Unix socket, TCP+mTLS
    work = Path(tempfile.mkdtemp(prefix="kbench-connect-"))
    pki = make_demo_pki(work / "pki")
    endpoint_proc = subprocess.Popen(
        [sys.executable, "-m", __spec__.name, "--endpoint"], stdout=subprocess.PIPE, cwd=ROOT
    )
    results: dict[str, object] = {"machine": machine(), "size_mib": options.size_mib, "rounds": options.rounds}
    finished = False
    try:
        assert endpoint_proc.stdout is not None
        endpoint = f"127.0.0.1:{int(endpoint_proc.stdout.readline())}"
        direct = asyncio.run(best_of(options.rounds, direct_opener(endpoint), size, share))
        results["direct_tcp"] = direct
        print(f"direct TCP        down {direct['download_mib_s']:8.1f} MiB/s   up {direct['upload_mib_s']:8.1f} MiB/s")
        for kind in ("uds", "tls"):
            with proxy(kind, work, pki) as frontend:
                opener = tunnel_opener(frontend, endpoint)
                asyncio.run(wait_ready(opener))
                figures = asyncio.run(best_of(options.rounds, opener, size, share))
            figures["download_ratio"] = round(figures["download_mib_s"] / direct["download_mib_s"], 3)
            figures["upload_ratio"] = round(figures["upload_mib_s"] / direct["upload_mib_s"], 3)
            results[f"http_connect_{kind}"] = figures
            print(
                f"http-connect {kind:4} down {figures['download_mib_s']:8.1f} MiB/s"
                f" ({figures['download_ratio']:.1%} of direct)   up {figures['upload_mib_s']:8.1f} MiB/s"
                f" ({figures['upload_ratio']:.1%} of direct)"
            )
        finished = True
    finally:
        endpoint_proc.kill()
        endpoint_proc.wait(timeout=10)
        if finished:
            shutil.rmtree(work, ignore_errors=True)  # the throwaway PKI's keys, sockets, logs
        else:
            print(f"server and agent logs kept in {work}", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "http_connect_throughput.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
