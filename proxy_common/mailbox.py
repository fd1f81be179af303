"""A bounded FIFO between producers and exactly one consumer task.

SHELL (asyncio). Used for every gRPC stream's outgoing messages and for every
connection's bytes on their way to a socket. Items have a size (payload bytes); control
items have size 0 and always fit, so a close can never be refused for lack of room.
Order is strictly FIFO, so a close queued after data is delivered after it.

Backpressure policy: a producer that may wait (a frontend reader feeding an agent stream,
an endpoint reader feeding a server stream) awaits `put()`, which waits for room. A
producer that must not wait for one connection (the shared reader of an agent stream)
uses `put_within()`, which waits at most a bounded time and reports failure, so that
the caller closes that one connection instead of stalling the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MailboxClosed(Exception):
    """Raised by put() after close(): the consumer is gone or finishing."""


class Mailbox(Generic[T]):
    def __init__(self, max_bytes: int, size_of: Callable[[T], int]) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._size_of = size_of
        # Made on the first item and dropped once drained: an idle mailbox holds no deque
        # (its first block is over half a KiB, and a control plane keeps thousands idle).
        self._items: deque[T] | None = None
        self._bytes = 0
        self._closed = False
        # Waiters are created only while someone waits: thousands of idle mailboxes stay small.
        self._reader: asyncio.Future[None] | None = None
        self._writers: list[asyncio.Future[None]] = []
        # For a consumer that runs only while there is work (no task waits in get() while
        # the mailbox is idle): called when an item arrives, or the mailbox closes, and no
        # reader is waiting. It must not wait; it typically starts the consumer.
        self.when_unattended: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    @property
    def closed(self) -> bool:
        return self._closed

    def has_room(self) -> bool:
        return self._bytes < self.max_bytes

    def force(self, item: T) -> None:
        """Append regardless of the byte cap (control messages, or a first oversized item)."""
        if self._closed:
            return
        size = self._size_of(item)
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self._bytes += size
        self._wake_reader()

    def offer(self, item: T) -> bool:
        """Append if there is room now; False otherwise (nothing is appended)."""
        if self._closed:
            raise MailboxClosed
        if self._bytes >= self.max_bytes:
            return False
        self.force(item)
        return True

    async def put(self, item: T) -> None:
        """Wait for room, then append. Raises MailboxClosed once the mailbox is closed."""
        while not self.offer(item):
            await self._next_change()

    async def wait_for_room(self) -> None:
        """Wait until there is room or the mailbox is closed; nothing is appended (for a
        producer that must choose its mailbox again once it may go on)."""
        while not self._closed and self._bytes >= self.max_bytes:
            await self._next_change()

    async def _next_change(self) -> None:
        """Wait until room is made or the mailbox is closed or cleared."""
        waiter = asyncio.get_running_loop().create_future()
        self._writers.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._writers:
                self._writers.remove(waiter)

    async def put_within(self, item: T, seconds: float) -> bool:
        """Like put(), but give up after `seconds` and return False."""
        if self.offer(item):
            return True
        try:
            async with asyncio.timeout(seconds):
                await self.put(item)
        except TimeoutError:
            return False
        return True

    async def get(self) -> T | None:
        """The next item, or None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return self._take()

    def get_nowait(self) -> T | None:
        return self._take() if self._items else None

    def get_nowait_if(self, wanted: Callable[[T], bool]) -> T | None:
        """The next item if there is one and `wanted(item)`; otherwise None and nothing taken."""
        items = self._items
        return self._take() if items and wanted(items[0]) else None

    def close(self) -> None:
        """No more items will be accepted; the consumer drains what is queued, then gets None.
        Closing again changes nothing."""
        if self._closed:
            return
        self._closed = True
        self._wake_reader()
        self._wake_writers()

    def clear(self) -> None:
        """Drop everything queued (the consumer is gone)."""
        self._items = None
        self._bytes = 0
        self._wake_writers()

    def _take(self) -> T:
        items = self._items
        assert items is not None
        item = items.popleft()
        if not items:
            self._items = None
        self._bytes -= self._size_of(item)
        if self._writers and self._bytes < self.max_bytes:
            self._wake_writers()
        return item

    def _wake_reader(self) -> None:
        if self._reader is not None:
            if not self._reader.done():
                self._reader.set_result(None)
        elif self.when_unattended is not None:
            self.when_unattended()

    def _wake_writers(self) -> None:
        """Every waiting producer retries (each re-checks the room, in FIFO order, and waits
        again with a new waiter if there is none)."""
        waiters, self._writers = self._writers, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
