"""Capture leases: one holder per source, a token that grows on every takeover,
expiry by the store's clock, and the fence in the enqueue transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from dbevents.errors import CaptureLost
from dbevents.protocols import LeasesCapture, capture_leasing
from dbevents.testing import make_event
from dbevents.values import Position
from dbevents_store_postgres import PostgresStore

OpenPg = Callable[..., Awaitable[PostgresStore]]
Exec = Callable[..., list[tuple[object, ...]]]


async def test_one_holder_at_a_time_and_tokens_grow(open_pg: OpenPg) -> None:
    a, b = await open_pg(), await open_pg()
    assert isinstance(a, LeasesCapture) and capture_leasing(a) is a
    token = await a.acquire_capture("app", "A", 30.0)
    assert token == 1
    assert await b.acquire_capture("app", "B", 30.0) is None
    # Another source is another lease.
    assert await b.acquire_capture("other", "B", 30.0) == 1
    assert await a.renew_capture("app", "A", 1, 30.0)
    assert not await b.renew_capture("app", "B", 1, 30.0)
    # A clean release lets the standby in at once, with a larger token.
    await a.release_capture("app", "A", 1)
    assert await b.acquire_capture("app", "B", 30.0) == 2
    assert not await a.renew_capture("app", "A", 1, 30.0)
    leases = {lease.source: lease for lease in await a.capture_leases()}
    assert (leases["app"].holder, leases["app"].token, leases["app"].live) == ("B", 2, True)


async def test_an_expired_lease_is_taken_over_by_the_store_clock(open_pg: OpenPg) -> None:
    a, b = await open_pg(), await open_pg()
    assert await a.acquire_capture("app", "A", 0.2) == 1
    while (token := await b.acquire_capture("app", "B", 30.0)) is None:
        await asyncio.sleep(0.05)  # bounded by the 0.2 s lease
    assert token == 2
    assert not await a.renew_capture("app", "A", 1, 30.0)


async def test_the_fence_refuses_a_taken_over_holders_writes(open_pg: OpenPg,
                                                             pg_exec: Exec,
                                                             pg_schema: str) -> None:
    old, new = await open_pg(), await open_pg()
    assert await old.acquire_capture("app", "A", 0.2) == 1
    first = make_event(n=1)
    assert await old.enqueue([first], {"app": Position("1")}) == 1
    while await new.acquire_capture("app", "B", 30.0) is None:
        await asyncio.sleep(0.05)
    late = make_event(n=2)
    with pytest.raises(CaptureLost, match="held by B with token 2"):
        await old.enqueue([late], {"app": Position("2")})
    with pytest.raises(CaptureLost):
        await old.enqueue_held([late], {"app": Position("2")}, 30.0)
    with pytest.raises(CaptureLost):
        await old.enqueue([], {"app": Position("3")})
    # Nothing of the refused writes is stored: neither events nor checkpoint.
    assert await new.checkpoint("app") == Position("1")
    assert pg_exec(f"SELECT id FROM {pg_schema}.events") == [(first.id,)]
    # The new holder writes; a source nobody leases is not fenced.
    assert await new.enqueue([late], {"app": Position("2")}) == 1
    assert await old.enqueue([make_event(database="other")], {"other": Position("9")}) == 1


async def test_an_enqueue_in_flight_finishes_before_a_takeover(open_pg: OpenPg) -> None:
    """The fence locks the lease row until the enqueue commits, so a takeover
    waits for it and the new holder reads the checkpoint it wrote."""
    old, new = await open_pg(), await open_pg()
    assert await old.acquire_capture("app", "A", 0.2) == 1
    await asyncio.sleep(0.3)  # expired, not yet taken
    writes = [old.enqueue([make_event(n=i)], {"app": Position(str(i))}) for i in range(20)]
    results = await asyncio.gather(*writes, new.acquire_capture("app", "B", 30.0),
                                   return_exceptions=True)
    stored = [i for i, r in enumerate(results[:-1]) if r == 1]
    assert results[-1] == 2
    # Each write either committed whole under the old token or was refused; the
    # pool runs them in no fixed order, so which ones did is not fixed either.
    assert all(r == 1 or isinstance(r, CaptureLost) for r in results[:-1]), results
    checkpoint = await new.checkpoint("app")
    assert checkpoint in ({Position(str(i)) for i in stored} if stored else {None})
    # After the takeover the old holder stores nothing.
    with pytest.raises(CaptureLost):
        await old.enqueue([make_event(n=99)], {"app": Position("99")})
    assert await new.checkpoint("app") == checkpoint
