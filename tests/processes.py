"""The real binaries as child processes: `python -m proxy_server|proxy_agent ...`.

Each child's stderr (its log) is collected line by line by a task owned here; tests wait
for log lines with a deadline, signal the child by its PID, and wait for its exit status.
Only processes started here are ever signalled or killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.harness import wait_for

ROOT = Path(__file__).resolve().parent.parent


class Child:
    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._reader = asyncio.create_task(self._collect(proc.stderr), name=f"child-log {name}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    async def wait_line(self, pattern: str, *, timeout: float = 20.0) -> re.Match[str]:
        """The first log line matching `pattern` (searching from the start of the log)."""
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            if self.proc.returncode is not None and self._reader.done():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before logging {pattern!r}:\n{self.log}")
            for line in self.lines:
                if match := regex.search(line):
                    found.append(match)
                    return True
            return False

        await wait_for(seen, timeout=timeout, what=f"{self.name} to log {pattern!r}")
        return found[0]

    async def port(self, listener: str, *, timeout: float = 20.0) -> int:
        """The port a listener reported at start-up (for port-0 configurations)."""
        match = await self.wait_line(rf"{listener} address=\S*?:(\d+)\b", timeout=timeout)
        return int(match.group(1))

    def terminate(self) -> None:
        """SIGTERM to this child, by its PID."""
        os.kill(self.pid, signal.SIGTERM)

    async def wait_exit(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def aclose(self) -> None:
        """Kill the child if it is still running; reap it and its log reader."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def child(module: str, *args: str, name: str = "") -> AsyncIterator[Child]:
    """Run `python -m module args...` from the repository root for the duration of the block."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Child(proc, name or module)
    try:
        yield running
    finally:
        await running.aclose()
