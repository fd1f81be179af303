"""Mailbox (bounded FIFO, lazily created waiters) and race() (first to end cancels the rest)."""

from __future__ import annotations

import asyncio

import pytest

from proxy_common.mailbox import Mailbox, MailboxClosed
from proxy_common.messages import CloseResponse, Data, DialResponse, Message
from proxy_common.streams import COALESCE_BYTES, next_outgoing, split_data
from proxy_common.tasks import cancel_and_wait, race


def sized() -> Mailbox[bytes]:
    return Mailbox(8, len)


async def test_fifo_with_control_items_always_fitting() -> None:
    box = sized()
    assert box.offer(b"12345678")
    assert not box.offer(b"x")  # full
    box.force(b"")  # a control item of size 0 still goes in
    assert box.buffered_bytes == 8
    assert [await box.get(), await box.get()] == [b"12345678", b""]
    assert box.buffered_bytes == 0


async def test_put_waits_for_room_and_resumes_in_order() -> None:
    box = sized()
    await box.put(b"aaaaaaaa")
    first = asyncio.create_task(box.put(b"bbbb"))
    second = asyncio.create_task(box.put(b"cccc"))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    assert await box.get() == b"aaaaaaaa"
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert [await box.get(), await box.get()] == [b"bbbb", b"cccc"]
    assert box._writers == []  # no waiter is left behind


async def test_get_waits_then_close_drains_then_ends() -> None:
    box = sized()
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not reader.done()
    box.force(b"hi")
    assert await asyncio.wait_for(reader, 1) == b"hi"
    box.force(b"last")
    box.close()
    assert await box.get() == b"last"
    assert await box.get() is None
    with pytest.raises(MailboxClosed):
        await box.put(b"late")


async def test_close_and_clear_release_waiting_producers() -> None:
    box = sized()
    box.force(b"12345678")
    waiting = asyncio.create_task(box.put(b"more"))
    await asyncio.sleep(0)
    box.close()
    with pytest.raises(MailboxClosed):
        await asyncio.wait_for(waiting, 1)
    box.clear()
    assert box.buffered_bytes == 0 and len(box) == 0


async def test_put_within_gives_up_after_the_wait() -> None:
    box = sized()
    box.force(b"12345678")
    assert await box.put_within(b"x", 0.01) is False
    assert box._writers == []
    assert box.get_nowait() == b"12345678"
    assert await box.put_within(b"x", 0.01) is True


async def test_cancelled_get_leaves_the_mailbox_usable() -> None:
    box = sized()
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    box.force(b"ok")
    assert await box.get() == b"ok"


async def test_when_unattended_is_called_only_while_no_reader_waits() -> None:
    box = sized()
    calls: list[int] = []
    box.when_unattended = lambda: calls.append(len(box))
    box.force(b"a")  # nobody waits in get(): the consumer must be started
    box.force(b"b")
    assert calls == [1, 2]
    assert [box.get_nowait(), box.get_nowait()] == [b"a", b"b"]
    reader = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.force(b"c")  # a reader waits: it is woken instead
    assert await asyncio.wait_for(reader, 1) == b"c"
    assert calls == [1, 2]
    box.close()  # the consumer must also learn of the close
    assert calls == [1, 2, 0]


async def test_an_idle_mailbox_holds_no_queue_storage() -> None:
    box = sized()
    assert box._items is None and len(box) == 0
    box.force(b"ab")
    box.force(b"cd")
    assert await box.get() == b"ab"
    assert box._items is not None  # still holding one
    assert box.get_nowait() == b"cd"
    assert box._items is None and len(box) == 0  # drained: the deque is gone
    box.force(b"ef")
    box.clear()
    assert box._items is None and box.buffered_bytes == 0
    box.force(b"gh")  # and it comes back for the next item
    assert box.get_nowait_if(lambda item: item == b"gh") == b"gh"


async def test_close_twice_changes_nothing_and_calls_the_hook_once() -> None:
    box = sized()
    calls: list[bool] = []
    box.when_unattended = lambda: calls.append(box.closed)
    box.close()
    box.close()
    box.force(b"late")  # refused after close: no item, no call
    assert calls == [True]
    assert len(box) == 0 and await box.get() is None


# -------------------------------------------------------------- cancel_and_wait
async def test_cancel_and_wait_returns_once_the_task_has_ended() -> None:
    cleaned = asyncio.Event()

    async def worker() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.set()

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), 1)
    assert task.cancelled() and cleaned.is_set()


async def test_cancel_and_wait_finishes_the_task_before_passing_our_cancellation_on() -> None:
    release = asyncio.Event()
    winding_down = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            winding_down.set()
            await release.wait()  # swallows the first cancellation while it winds down
            raise

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(task))
    await asyncio.wait_for(winding_down.wait(), 1)
    stopper.cancel()  # the caller is cancelled while it waits
    await asyncio.wait((task,), timeout=1)
    assert task.done()  # cancelled again, so it did not wait for `release`
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stopper, 1)


async def test_cancel_and_wait_logs_an_error_the_task_raised_while_stopping(caplog: pytest.LogCaptureFixture) -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("boom in cleanup") from None

    task = asyncio.create_task(fails_on_cancel(), name="cleanup-fails")
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert "cleanup-fails" in caplog.text and "boom in cleanup" in caplog.text


# ------------------------------------------------------------------------ race
async def test_race_first_to_return_cancels_the_others() -> None:
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def quick() -> None:
        await asyncio.sleep(0)

    # awaited directly (pytest-timeout bounds it), so this task's cancel count can be checked
    await race(forever("task"), quick())  # the inline one ends first
    assert cancelled == ["task"]
    await race(quick(), forever("inline"))  # a task ends first
    assert cancelled == ["task", "inline"]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_race_propagates_errors_as_a_group() -> None:
    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("bad packet")

    async def forever() -> None:
        await asyncio.sleep(3600)

    for coros in ((boom(), forever()), (forever(), boom())):
        with pytest.raises(ExceptionGroup) as info:
            await asyncio.wait_for(race(*coros), 1)
        assert [str(e) for e in info.value.exceptions] == ["bad packet"]


async def test_race_cancelled_from_outside_cancels_everything() -> None:
    started = asyncio.Event()
    ended: list[str] = []

    async def forever(name: str) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append(name)

    outer = asyncio.create_task(race(forever("a"), forever("b")))
    await started.wait()
    await asyncio.sleep(0)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert sorted(ended) == ["a", "b"]


async def test_race_when_the_inline_side_swallows_our_cancellation() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return  # ends normally instead

    async def quick() -> None:
        return

    await race(quick(), stubborn())
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0)  # and no cancellation is left pending for this task


# ----------------------------------------------------------- coalescing writes
async def test_queued_data_for_one_connection_goes_out_as_one_packet_in_order() -> None:

    box: Mailbox[Message] = Mailbox(1 << 30, lambda m: len(m.data) if type(m) is Data else 0)
    quarter = bytes(COALESCE_BYTES // 4)
    for item in (
        DialResponse(dial_id=1, conn_id=7),
        Data(7, b"a"), Data(7, b"b"), Data(7, b"c"),
        Data(8, b"other"),  # another connection breaks the run
        Data(7, b"d"), Data(7, b"", error="read failed"),  # an error is never merged
        *[Data(7, quarter)] * 5,  # the size cap splits a run: never a byte over it
        Data(7, bytes(COALESCE_BYTES)), Data(7, b"z"),  # a full-size packet is never joined
        CloseResponse(7),
    ):
        box.force(item)
    box.close()
    sent = []
    while (message := await next_outgoing(box)) is not None:
        sent.append(message)
    assert sent == [
        DialResponse(dial_id=1, conn_id=7),
        Data(7, b"abc"), Data(8, b"other"), Data(7, b"d"), Data(7, b"", error="read failed"),
        Data(7, quarter * 4), Data(7, quarter), Data(7, bytes(COALESCE_BYTES)), Data(7, b"z"),
        CloseResponse(7),
    ]
    assert box.buffered_bytes == 0


async def test_a_small_packet_waits_a_few_loop_turns_for_its_followers() -> None:

    box: Mailbox[Message] = Mailbox(1 << 20, lambda m: len(m.data) if type(m) is Data else 0)
    box.force(Data(1, b"first "))
    asyncio.get_running_loop().call_soon(box.force, Data(1, b"second"))  # the reader's next packet
    assert await next_outgoing(box) == Data(1, b"first second")


def test_split_data_cuts_only_data_and_keeps_an_error_on_the_last_piece() -> None:

    assert split_data(CloseResponse(3), 2) == [CloseResponse(3)]
    assert split_data(Data(3, b"abcde"), 8) == [Data(3, b"abcde")]
    assert split_data(Data(3, b"abcde", error="eof"), 2) == [Data(3, b"ab"), Data(3, b"cd"), Data(3, b"e", error="eof")]
    assert split_data(Data(3, b"abcd"), 2) == [Data(3, b"ab"), Data(3, b"cd")]


async def test_race_cancelled_again_cancels_a_sibling_that_swallowed_the_first() -> None:
    swallowed = asyncio.Event()

    async def swallows_once() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(3600)  # ends only at the second cancellation

    async def forever() -> None:
        await asyncio.sleep(3600)

    outer = asyncio.create_task(race(swallows_once(), forever()))
    await asyncio.sleep(0)
    outer.cancel()
    await asyncio.wait_for(swallowed.wait(), 1)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(outer, 1)
