"""Cross-tier fixtures: a throw-away PKI, a running stack, and leak checks.

Every async test is checked for leftovers: tasks still running on its loop and sockets
still open in the process after it ends (allowing a short settling time) fail the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy_common import runtime

# The in-process stacks run with the same grpc and malloc settings as the shipped
# binaries; this must happen before anything imports grpc.
runtime.prepare_process()

from proxy_common.certs import DemoPki, make_demo_pki  # noqa: E402
from tests.harness import Stack, describe_sockets, socket_fds, wait_for  # noqa: E402


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPki:
    return make_demo_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def short_tmp() -> AsyncIterator[Path]:
    """A short directory path (Unix socket paths are limited to ~100 bytes)."""
    import shutil

    path = Path(tempfile.mkdtemp(prefix="kp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def grpc_warmed_up(pki: DemoPki, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Let grpc make its process-wide sockets once (its TLS client opens two on first use),
    so the per-test socket accounting sees only what a test itself leaves behind."""

    async def warm_up() -> None:
        running = await Stack(pki, Path(tempfile.mkdtemp(prefix="kp-"))).start()
        try:
            await running.add_agent()
        finally:
            await running.stop()

    asyncio.run(warm_up())


@pytest.fixture(autouse=True)
async def no_leaks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail the test if it leaves tasks running or sockets open behind it."""
    before_tasks = set(asyncio.all_tasks())
    before_sockets = socket_fds()
    yield
    if request.node.get_closest_marker("allow_leftovers"):
        return
    current = asyncio.current_task()

    def leftover_tasks() -> set[asyncio.Task[object]]:
        return {t for t in asyncio.all_tasks() - before_tasks if t is not current and not t.done()}

    with contextlib.suppress(AssertionError):
        await wait_for(lambda: not leftover_tasks() and not (socket_fds() - before_sockets), timeout=5.0)
    tasks = leftover_tasks()
    assert not tasks, f"tasks left running: {sorted(t.get_name() for t in tasks)}"
    sockets = socket_fds() - before_sockets
    assert not sockets, f"{len(sockets)} socket(s) left open: {describe_sockets(sockets)}"


@pytest.fixture
async def stack(pki: DemoPki, short_tmp: Path) -> AsyncIterator[Stack]:
    """A started proxy-server (gRPC mode on a Unix socket) with no agent yet.

    At teardown the tables must be empty before anything is stopped.
    """
    running = await Stack(pki, short_tmp).start()
    try:
        yield running
        await running.wait_idle()
    finally:
        await running.stop()
