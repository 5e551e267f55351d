"""Two readers with one server_id: the server keeps the newest dump and ends the
older one. Under a capture lease the older reader is a holder that was paused
past its lease, and the newer one is the process that took the capture over:
the older one stops (CaptureLost) instead of reconnecting and ending the new
holder's dump in turn. Without a lease it reconnects, as after any drop."""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
import pytest
from dbevents.errors import CaptureLost
from dbevents_source_mysql import MysqlSource


def _source(env: Any, leased: bool) -> MysqlSource:
    source = MysqlSource(attrs.evolve(env.settings(), leased=leased))
    env.sources.append(source)
    return source


async def test_a_leased_reader_replaced_by_one_with_its_server_id_stops(
        mysql_env: Any, reading: Any) -> None:
    old = await reading(_source(mysql_env, leased=True))
    await mysql_env.write(1)
    await old.wait_for(1)
    new = await reading(_source(mysql_env, leased=True))
    assert new.source.server_id == old.source.server_id  # the default: same config, same id
    with pytest.raises(CaptureLost, match="another binlog reader with server_id"):
        await asyncio.wait_for(old._task, 20)
    await mysql_env.write(1)
    assert [c.doc["name"] for c in await new.wait_for(2)] == ["item 0", "item 0"]
    assert (await new.source.reader_stats())["reconnects"] == 0  # nobody ended its dump


async def test_an_unleased_reader_replaced_by_one_with_its_server_id_reconnects(
        mysql_env: Any, reading: Any) -> None:
    old = await reading(_source(mysql_env, leased=False))
    await mysql_env.write(1)
    await old.wait_for(1)
    new = await reading(_source(mysql_env, leased=False))
    await mysql_env.write(1)
    # Each reconnect ends the other's dump; both read on from where they were.
    assert len(await old.wait_for(2)) == 2
    assert len(await new.wait_for(2)) == 2
    assert (await old.source.reader_stats())["reconnects"] >= 1
