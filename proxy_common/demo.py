"""Local demo: a real proxy-server and proxy-agent on loopback, one tunneled HTTP request.

Run with `make demo` (or `python -m proxy_common.demo`). It makes throw-away certificates,
starts `proxy-server` (gRPC frontend on a Unix socket, TLS agent port) and `proxy-agent`
as separate processes, serves a small HTTP page on 127.0.0.1, sends a GET through the
Unix socket with the client library, prints the answer and the route it took, and stops
everything. Exit status 0 means the request went through.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from proxy_common.certs import make_demo_pki
from proxy_common.client import TunnelDialError, open_tunnel

SERVER_ID = "demo-server"
AGENT_ID = "demo-agent"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"Hello from the node side! You asked for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT)


async def tunneled_get(uds: str, address: str, path: str) -> bytes:
    deadline = time.monotonic() + 20
    while True:
        try:
            tunnel = await open_tunnel(address, uds_path=uds, timeout=5)
            break
        except TunnelDialError as exc:
            if time.monotonic() > deadline:
                raise
            if "No agent available" not in str(exc) and "tunnel closed" not in str(exc):
                raise
            await asyncio.sleep(0.2)  # the agent is still connecting
    reader, writer = await tunnel.open_streams()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return answer


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="konnectivity-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    page = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=page.serve_forever, name="demo-http", daemon=True).start()
    try:
        pki = make_demo_pki(work / "pki")
        uds = str(work / "konnectivity-server.socket")
        agent_port = free_port()
        print(f"1. throw-away PKI in {work / 'pki'}")
        procs.append(start([
            "proxy_server", "--mode=grpc", f"--uds-name={uds}", "--server-port=0",
            "--agent-bind-address=127.0.0.1", f"--agent-port={agent_port}",
            f"--cluster-cert={pki.server_cert}", f"--cluster-key={pki.server_key}",
            f"--server-id={SERVER_ID}", f"--health-port={free_port()}", f"--admin-port={free_port()}",
            "--health-bind-address=127.0.0.1",
        ], work / "server.log"))
        procs.append(start([
            "proxy_agent", "--proxy-server-host=127.0.0.1", f"--proxy-server-port={agent_port}",
            f"--ca-cert={pki.ca_cert}", f"--agent-id={AGENT_ID}", "--sync-interval=200ms",
            f"--health-server-port={free_port()}", f"--admin-server-port={free_port()}",
            "--health-server-host=127.0.0.1",
        ], work / "agent.log"))
        print(f"2. proxy-server (pid {procs[0].pid}) frontend {uds}, agent port 127.0.0.1:{agent_port}")
        print(f"3. proxy-agent  (pid {procs[1].pid}) id {AGENT_ID}")
        address = f"127.0.0.1:{page.server_address[1]}"
        print(f"4. HTTP endpoint on {address}")
        answer = asyncio.run(tunneled_get(uds, address, "/demo"))
        print("5. answer through the tunnel:")
        print("   " + answer.decode(errors="replace").replace("\r\n", "\n   ").rstrip())
        print(f"   route: client -> unix:{uds} -> proxy-server {SERVER_ID} -> TLS 127.0.0.1:{agent_port}"
              f" -> proxy-agent {AGENT_ID} -> tcp {address}")
        return 0 if b" 200 OK" in answer.split(b"\r\n", 1)[0] else 1
    except Exception as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        for log in ("server.log", "agent.log"):
            if (work / log).exists():
                print(f"--- {log}\n{(work / log).read_text()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        page.shutdown()
        page.server_close()
        shutil.rmtree(work, ignore_errors=True)
        print("6. stopped server, agent and endpoint")


if __name__ == "__main__":
    sys.exit(main())
