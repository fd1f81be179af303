"""The frontend's Unix socket: who may open it, what may be replaced, and clean removal.

On a Unix socket the file mode is the only access control (anyone who can connect can
dial any address an agent reaches), so it is created owner-only, or owner+group with
`--uds-group-access`, never wider, and never with a window where it is wider.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from proxy_common.certs import DemoPki
from proxy_common.client import open_tunnel
from proxy_common.errors import ConfigError
from proxy_server.app import ProxyServer
from tests.harness import ROOT, Stack, echo_handler, endpoint, server_config

pytestmark = pytest.mark.integration


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on any more (what a crashed server leaves)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    os.chmod(path, 0o777)  # recognisable: ours are never created like this


async def echo_through(stack: Stack) -> bytes:
    async with endpoint(echo_handler) as ep:
        tunnel = await open_tunnel(ep.address, uds_path=stack.uds)
        await tunnel.send(b"via the socket")
        answer = await tunnel.receive()
        await tunnel.aclose()
        return answer


async def start_refused(pki: DemoPki, tmp: Path, **overrides: object) -> str:
    server = ProxyServer(server_config(pki, tmp, **overrides))
    try:
        with pytest.raises(ConfigError) as caught:
            await server.start()
    finally:
        await server.stop(0)
    return str(caught.value)


async def test_the_socket_is_owner_only_by_default(pki: DemoPki, short_tmp: Path) -> None:
    umask = os.umask(0o022)  # a typical permissive umask must not widen the socket
    try:
        stack = await Stack(pki, short_tmp).start()
    finally:
        os.umask(umask)
    try:
        assert stat.S_ISSOCK(Path(stack.uds).lstat().st_mode)
        assert mode_of(Path(stack.uds)) == 0o600
        await stack.add_agent()
        assert await echo_through(stack) == b"via the socket"
    finally:
        await stack.stop()


async def test_group_access_widens_to_the_group_only(pki: DemoPki, short_tmp: Path) -> None:
    stack = await Stack(pki, short_tmp, uds_group_access=True).start()
    try:
        assert mode_of(Path(stack.uds)) == 0o660
    finally:
        await stack.stop()


async def test_starting_leaves_the_process_umask_as_it_was(pki: DemoPki, short_tmp: Path) -> None:
    before = os.umask(0o027)
    try:
        stack = await Stack(pki, short_tmp).start()
        await stack.stop()
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(before)


async def test_a_missing_parent_directory_is_created(pki: DemoPki, short_tmp: Path) -> None:
    stack = await Stack(pki, short_tmp, uds_name=str(short_tmp / "run" / "k.sock")).start()
    try:
        assert mode_of(Path(stack.uds)) == 0o600
    finally:
        await stack.stop()


async def test_a_stale_socket_is_replaced_by_default(pki: DemoPki, short_tmp: Path) -> None:
    path = short_tmp / "proxy.sock"
    stale_socket(path)
    stack = await Stack(pki, short_tmp).start()
    try:
        assert mode_of(path) == 0o600
        await stack.add_agent()
        assert await echo_through(stack) == b"via the socket"
    finally:
        await stack.stop()


async def test_an_existing_socket_is_refused_without_delete_existing(pki: DemoPki, short_tmp: Path) -> None:
    path = short_tmp / "proxy.sock"
    stale_socket(path)
    message = await start_refused(pki, short_tmp, delete_existing_uds_file=False)
    assert "already exists (use --delete-existing-uds-file)" in message
    assert stat.S_ISSOCK(path.lstat().st_mode) and mode_of(path) == 0o777  # left alone


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
async def test_anything_but_a_socket_is_never_deleted(pki: DemoPki, short_tmp: Path, kind: str) -> None:
    path = short_tmp / "proxy.sock"
    target = short_tmp / "precious"
    target.write_text("keep me")
    if kind == "file":
        path.write_text("keep me too")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(target)
    message = await start_refused(pki, short_tmp, delete_existing_uds_file=True)
    assert "exists and is not a socket; refusing to replace it" in message
    assert target.read_text() == "keep me"
    if kind == "file":
        assert path.read_text() == "keep me too"
    elif kind == "directory":
        assert path.is_dir()
    else:
        assert path.is_symlink()


async def test_the_socket_is_removed_on_stop(pki: DemoPki, short_tmp: Path) -> None:
    stack = await Stack(pki, short_tmp).start()
    path = Path(stack.uds)
    assert path.exists()
    await stack.stop()
    assert not path.exists() and not path.is_symlink()


async def test_the_command_removes_its_socket_on_sigterm(pki: DemoPki, short_tmp: Path) -> None:
    path = short_tmp / "cli.sock"

    def run() -> tuple[int, int, bool]:
        args = [
            sys.executable, "-m", "proxy_server", f"--uds-name={path}", "--server-port=0",
            "--agent-bind-address=127.0.0.1", "--agent-port=0", f"--cluster-cert={pki.server_cert}",
            f"--cluster-key={pki.server_key}", "--health-bind-address=127.0.0.1", "--health-port=0",
            "--admin-port=0", "--v=2",
        ]
        process = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        assert process.stderr is not None
        mode = -1
        try:
            for line in process.stderr:  # EOF ends this if the server cannot start
                if re.search(r"frontend listening mode=grpc uds=", line):
                    mode = mode_of(path)
                    break
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            process.stderr.close()
        return status, mode, path.exists()

    status, mode, exists = await asyncio.to_thread(run)
    assert (status, mode, exists) == (0, 0o600, False)
