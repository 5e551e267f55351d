"""Batches from the reader thread to the event loop, bounded.

The reader publishes every transaction as soon as it commits. While the consumer
is busy, new changes are appended to the newest batch that it has not taken yet
(up to ``batch_size``), so batches grow under load and stay small, with low
latency, when the consumer keeps up. At most ``max_batches`` batches wait; the
reader then blocks, which stops it reading the binlog: nothing is buffered
without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any

from dbevents import Change, ChangeBatch, Position


class Closed(Exception):
    """The consumer went away; the reader stops."""


class _Pending:
    __slots__ = ("changes", "checkpoint")

    def __init__(self, changes: list[Change], checkpoint: Position | None) -> None:
        self.changes = changes
        self.checkpoint = checkpoint


class Handoff:
    def __init__(self, loop: asyncio.AbstractEventLoop, batch_size: int,
                 max_batches: int = 4) -> None:
        self._loop = loop
        self._batch_size = batch_size
        self._max_batches = max_batches
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[_Pending] = deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    # -- reader thread --------------------------------------------------------
    def publish(self, changes: list[Change], checkpoint: Position | None) -> None:
        """Hand over changes in commit order (the list belongs to the handoff from
        now on); ``checkpoint`` is where a restart may resume once they are stored
        (None inside a transaction). Blocks while the consumer is ``max_batches``
        behind."""
        with self._cond:
            if self._closed:
                raise Closed()
            items = self._items
            if items and len(items[-1].changes) + len(changes) <= self._batch_size:
                tail = items[-1]
                tail.changes.extend(changes)
                if checkpoint is not None:
                    # A later resume point still covers every change before it.
                    tail.checkpoint = checkpoint
                return
            while len(items) >= self._max_batches:
                self._cond.wait()
                if self._closed:
                    raise Closed()
            items.append(_Pending(changes, checkpoint))
            waiter, self._waiter = self._waiter, None
        self._wake(waiter)

    def fail(self, error: BaseException) -> None:
        """The reader stopped with ``error``: raised to the consumer after the
        batches published before it."""
        with self._cond:
            self._error = error
            waiter, self._waiter = self._waiter, None
        self._wake(waiter)

    def _wake(self, waiter: asyncio.Future[None] | None) -> None:
        if waiter is None:
            return
        # RuntimeError: the event loop is gone, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_set, waiter)

    # -- event loop -------------------------------------------------------------
    async def get(self) -> ChangeBatch:
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify()
                    return ChangeBatch(tuple(item.changes), item.checkpoint)
                if self._error is not None:
                    raise self._error
                waiter = self._waiter = self._loop.create_future()
            await waiter

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()


def _set(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)
