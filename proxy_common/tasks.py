"""Small structured-concurrency helpers on asyncio 3.11.

SHELL. Every task has an owner that cancels and awaits it; `race()` runs siblings until the
first one ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("proxy_common.tasks")
T = TypeVar("T")


async def race(*coros: Coroutine[Any, Any, None], names: tuple[str, ...] = ()) -> None:
    """Run coroutines side by side; when the first one ends, cancel the others and wait for them.

    Errors (anything but a normal return or the cancellation we caused) propagate as one
    ExceptionGroup, as a TaskGroup raises them. The last coroutine runs inline in the
    calling task and the others as owned tasks, so a race of two costs one extra task: it
    runs once or twice per tunnelled connection, and thousands of connections stay open.
    """
    if not coros:
        return
    current = asyncio.current_task()
    assert current is not None, "race() runs inside a task"
    cancels_before = current.cancelling()
    *others, inline = coros
    tasks = [
        asyncio.create_task(coro, name=names[index] if index < len(names) else None)
        for index, coro in enumerate(others)
    ]
    state = {"inline_running": True, "we_cancelled": False}

    def first_task_ended(_task: asyncio.Task[None]) -> None:
        if state["inline_running"] and not state["we_cancelled"]:
            state["we_cancelled"] = True
            current.cancel()

    for task in tasks:
        task.add_done_callback(first_task_ended)
    errors: list[BaseException] = []
    outer_cancel = False
    try:
        await inline
    except asyncio.CancelledError:
        # Ours (a sibling ended first) unless the task was also cancelled from outside.
        outer_cancel = not state["we_cancelled"] or current.uncancel() > cancels_before
        state["we_cancelled"] = False
    except BaseException as exc:  # gathered and re-raised below
        errors.append(exc)
    finally:
        state["inline_running"] = False
        if state["we_cancelled"]:
            current.uncancel()  # the inline coroutine swallowed our cancellation
        for task in tasks:
            task.remove_done_callback(first_task_ended)
            task.cancel()
        # Wait for the siblings even if we are cancelled again meanwhile: they must not outlive us.
        while not all(task.done() for task in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError:
                outer_cancel = True
                for task in tasks:  # a sibling that swallowed one cancellation gets another
                    task.cancel()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]
    if outer_cancel:
        for error in errors:  # they would vanish with the cancellation: say what they were
            log.warning("error in a cancelled race error=%r", error)
        raise asyncio.CancelledError
    if errors:
        raise BaseExceptionGroup("race", errors)


async def cancel_and_wait(task: asyncio.Task[Any], expected: tuple[type[BaseException], ...] = ()) -> None:
    """Cancel `task` and wait until it has ended, even if the caller is cancelled meanwhile
    (then the caller's cancellation is raised afterwards). The task's own error, if any, is
    logged unless it is one of `expected`: nobody else will see it."""
    task.cancel()
    outer_cancel = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            outer_cancel = True
            task.cancel()
    error = None if task.cancelled() else task.exception()
    if error is not None and not isinstance(error, expected):
        log.warning("error in a cancelled task task=%s error=%r", task.get_name(), error)
    if outer_cancel:
        raise asyncio.CancelledError


def run(main: Coroutine[Any, Any, T]) -> T:
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
