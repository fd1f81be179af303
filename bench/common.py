"""Shared benchmark plumbing: real proxy-server, proxy-agent and endpoint processes.

Figures are reported as ratios against direct TCP measured in the same run, because these
machines are noisy. Every loop here is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy_common.certs import DemoPki, make_demo_pki
from proxy_common.client import open_tunnel
from proxy_common.tasks import run as arun  # the daemons' loop choice (uvloop when installed)

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def bounded(count: int, budget: float) -> Iterator[int]:
    """Up to `count` rounds, none started after `budget` seconds."""
    deadline = time.monotonic() + budget
    for index in range(count):
        if time.monotonic() > deadline:
            return
        yield index


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "kernel": platform.release()}


@dataclass
class Processes:
    """proxy-server + proxy-agent + endpoint, each its own process."""

    work: Path
    pki: DemoPki
    uds: str
    endpoint_port: int
    server: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]
    endpoint: subprocess.Popen[bytes]
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def endpoint_address(self) -> str:
        return f"127.0.0.1:{self.endpoint_port}"

    def pids(self) -> dict[str, int]:
        return {"server": self.server.pid, "agent": self.agent.pid}


def _python(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env)


@contextlib.contextmanager
def processes(
    *, server_args: tuple[str, ...] = (), agent_args: tuple[str, ...] = (), agents: int = 1,
    agent_env: dict[str, str] | None = None,
) -> Iterator[Processes]:
    work = Path(tempfile.mkdtemp(prefix="kbench-"))
    pki = make_demo_pki(work / "pki")
    uds = str(work / "proxy.sock")
    agent_port = free_port()
    endpoint = subprocess.Popen([sys.executable, "-m", "bench.endpoint"], stdout=subprocess.PIPE)
    assert endpoint.stdout is not None
    endpoint_port = int(endpoint.stdout.readline())
    server = _python(
        "-m", "proxy_server", f"--uds-name={uds}", "--server-port=0", "--agent-bind-address=127.0.0.1",
        f"--agent-port={agent_port}", f"--cluster-cert={pki.server_cert}", f"--cluster-key={pki.server_key}",
        "--server-id=bench-server", f"--health-port={free_port()}", f"--admin-port={free_port()}",
        "--health-bind-address=127.0.0.1", "-v=1", *server_args, log=work / "server.log",
    )
    agent_procs = [
        _python(
            "-m", "proxy_agent", "--proxy-server-host=127.0.0.1", f"--proxy-server-port={agent_port}",
            f"--ca-cert={pki.ca_cert}", f"--agent-id=bench-agent-{index}", "--sync-interval=200ms",
            f"--health-server-port={free_port()}", f"--admin-server-port={free_port()}",
            "--health-server-host=127.0.0.1", "-v=1", *agent_args, log=work / f"agent{index}.log",
            env={**os.environ, **agent_env} if agent_env else None,
        )
        for index in range(agents)
    ]
    running = Processes(work, pki, uds, endpoint_port, server, agent_procs[0], endpoint, agent_procs[1:])
    finished = False
    try:
        arun(wait_ready(running, http_connect="--mode=http-connect" in server_args))
        yield running
        finished = True
    finally:
        for proc in (server, *agent_procs, endpoint):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        if finished:
            shutil.rmtree(work, ignore_errors=True)
        else:  # keep the daemons' logs for whoever reads the failure
            print(f"bench: logs kept in {work}", file=sys.stderr)


async def _echo_once_grpc(running: Processes) -> None:
    tunnel = await open_tunnel(running.endpoint_address, uds_path=running.uds, timeout=5)
    await tunnel.send(b"ECHO\n")
    await tunnel.send(b"x")
    assert await tunnel.receive() == b"x"
    await tunnel.aclose()


async def _echo_once_http(running: Processes) -> None:
    reader, writer = await asyncio.open_unix_connection(running.uds)
    try:
        writer.write(f"CONNECT {running.endpoint_address} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        writer.write(b"ECHO\nx")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    finally:
        writer.close()


async def wait_ready(running: Processes, timeout: float = 30.0, *, http_connect: bool = False) -> None:
    """Until a tunnel to the endpoint works (the agent has connected)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await (_echo_once_http(running) if http_connect else _echo_once_grpc(running))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class RssSampler:
    """Peak RSS of some processes, sampled every `interval` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        import threading

        self.pids = pids
        self.interval = interval
        self.baseline = {name: rss_bytes(pid) for name, pid in pids.items()}
        self.peak = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError):
                    self.peak[name] = max(self.peak[name], rss_bytes(pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_results(name: str, results: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


MiB = 1 << 20
