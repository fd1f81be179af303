"""Small structured-concurrency helpers on asyncio 3.11.

SHELL. Every task belongs to a TaskGroup; `race()` runs siblings until the first one ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any


class _Finished(Exception):
    """Internal: a sibling ended normally."""


async def race(*coros: Coroutine[Any, Any, None], names: tuple[str, ...] = ()) -> None:
    """Run coroutines as sibling tasks; when the first returns, cancel the others.

    Exceptions other than a normal return propagate (as an ExceptionGroup, unwrapped when
    there is exactly one).
    """

    async def until_done(coro: Coroutine[Any, Any, None]) -> None:
        await coro
        raise _Finished

    try:
        async with asyncio.TaskGroup() as group:
            for index, coro in enumerate(coros):
                name = names[index] if index < len(names) else None
                group.create_task(until_done(coro), name=name)
    except* _Finished:
        pass


def run(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run, on uvloop when it is installed (set KONNECTIVITY_PY_LOOP=asyncio to opt out).

    uvloop cuts the event loop's own cost per packet; grpc.aio runs on it unchanged."""
    if os.environ.get("KONNECTIVITY_PY_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (possibly nested) group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@contextlib.contextmanager
def two_stage_signals(on_first: Callable[[], None], on_second: Callable[[], None]):  # type: ignore[no-untyped-def]
    """Call `on_first` at the first SIGTERM/SIGINT and `on_second` at any later one."""
    loop = asyncio.get_running_loop()
    seen = 0

    def handler() -> None:
        nonlocal seen
        seen += 1
        (on_first if seen == 1 else on_second)()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
