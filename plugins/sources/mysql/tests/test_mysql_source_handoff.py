"""The bounded hand-over from the reader thread to the event loop."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import pytest
from dbevents import Change, Operation, Position
from dbevents_source_mysql.handoff import Closed, Handoff

NOW = datetime.now(UTC)


def _changes(*keys: str) -> list[Change]:
    return [Change("app", "sql-mysql", "t", Operation.INSERT, k, NOW) for k in keys]


async def test_batches_grow_while_the_consumer_is_busy() -> None:
    h = Handoff(asyncio.get_running_loop(), batch_size=3)
    h.publish(_changes("a"), Position("f:1"))
    h.publish(_changes("b"), None)  # a chunk of a transaction still open
    h.publish(_changes("c"), Position("f:3"))
    h.publish(_changes("d"), Position("f:4"))  # would exceed batch_size: a new batch
    first, second = await h.get(), await h.get()
    assert [c.key for c in first.changes] == ["a", "b", "c"]
    assert first.checkpoint == Position("f:3")
    assert [c.key for c in second.changes] == ["d"] and second.checkpoint == Position("f:4")


async def test_a_chunk_without_checkpoint_keeps_the_earlier_resume_point() -> None:
    h = Handoff(asyncio.get_running_loop(), batch_size=10)
    h.publish(_changes("a"), Position("f:1"))
    h.publish(_changes("b"), None)
    batch = await h.get()
    assert [c.key for c in batch.changes] == ["a", "b"]
    assert batch.checkpoint == Position("f:1")  # b is read again after a restart


async def test_the_publisher_blocks_when_the_consumer_is_behind() -> None:
    loop = asyncio.get_running_loop()
    h = Handoff(loop, batch_size=1, max_batches=2)
    done = threading.Event()

    def produce() -> None:
        for k in "abcd":
            h.publish(_changes(k), Position(f"f:{k}"))
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    await asyncio.sleep(0.2)
    assert not done.is_set()  # two batches wait; the third publish is blocked
    got = [(await h.get()).changes[0].key for _ in range(4)]
    await asyncio.to_thread(thread.join, 5)
    assert got == ["a", "b", "c", "d"] and done.is_set()


async def test_an_error_follows_the_batches_before_it() -> None:
    h = Handoff(asyncio.get_running_loop(), batch_size=5)
    h.publish(_changes("a"), Position("f:1"))
    h.fail(RuntimeError("connection lost for good"))
    assert [c.key for c in (await h.get()).changes] == ["a"]
    with pytest.raises(RuntimeError, match="for good"):
        await h.get()


async def test_a_waiting_consumer_is_woken_from_the_thread() -> None:
    h = Handoff(asyncio.get_running_loop(), batch_size=5)
    getter = asyncio.create_task(h.get())
    await asyncio.sleep(0.05)
    await asyncio.to_thread(h.publish, _changes("a"), Position("f:1"))
    batch = await asyncio.wait_for(getter, 5)
    assert [c.key for c in batch.changes] == ["a"]


async def test_close_releases_a_blocked_publisher() -> None:
    h = Handoff(asyncio.get_running_loop(), batch_size=1, max_batches=1)
    h.publish(_changes("a"), None)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            h.publish(_changes("b"), None)
        except Closed as exc:
            errors.append(exc)

    thread = threading.Thread(target=produce)
    thread.start()
    await asyncio.sleep(0.1)
    h.close()
    await asyncio.to_thread(thread.join, 5)
    assert len(errors) == 1
