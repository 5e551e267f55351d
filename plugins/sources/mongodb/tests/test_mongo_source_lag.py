"""The MongoDB status probe: how far behind a checkpoint is, asked of a scripted
server (mockupdb) by a real pymongo client: the first change after the checkpoint,
and its cluster time against the server's operation time."""

from __future__ import annotations

from typing import Any

from bson import Timestamp
from dbevents import Position, SourceSettings
from dbevents_source_mongodb import MongoOptions, MongoSource
from dbevents_source_mongodb.convert import iso_utc
from dbevents_source_mongodb.decode import token_position
from mongo_fake import FakeReplicaSet, token


async def probe(fake: FakeReplicaSet, checkpoint: Position | None,
                **options: Any) -> dict[str, Any]:
    settings = SourceSettings(name="shop", url=fake.url(), options=MongoOptions(**options),
                              checkpoint=checkpoint)
    return dict(await MongoSource.probe_status(settings))


async def test_a_checkpoint_with_nothing_after_it_is_caught_up(fake: FakeReplicaSet) -> None:
    fake.write_orders(3)
    facts = await probe(fake, token_position(token(3)))
    assert facts["caught_up"] is True and facts["lag_seconds"] == 0
    # Changes the server filters out for this source (another collection) do not count.
    fake.noise(2)
    facts = await probe(fake, token_position(token(3)), collections=["orders"])
    assert facts["caught_up"] is True and facts["lag_seconds"] == 0
    # The probe's stream starts after the checkpoint.
    assert fake.stages[-1]["startAfter"] == token(3)


async def test_the_age_of_the_oldest_change_after_the_checkpoint(fake: FakeReplicaSet) -> None:
    fake.write_orders(3)
    # Event 2 committed at server time 1000; the server is now at 1120.
    fake.events[1]["clusterTime"] = Timestamp(1000, 2)
    fake.events[2]["clusterTime"] = Timestamp(1100, 3)
    fake.operation_time = Timestamp(1120, 1)
    facts = await probe(fake, token_position(token(1)))
    assert facts["caught_up"] is False and facts["lag_seconds"] == 120
    assert facts["oldest_waiting"] == iso_utc(fake.events[1]["wallTime"])
    assert facts["server_time"].startswith("1970-01-01T00:18:40")  # 1120 s after the epoch
    # Further on, only the newer change waits.
    assert (await probe(fake, token_position(token(2))))["lag_seconds"] == 20
    assert (await probe(fake, token_position(token(3))))["caught_up"] is True


async def test_without_a_checkpoint_or_with_a_lost_one(fake: FakeReplicaSet) -> None:
    fake.write_orders(2)
    facts = await probe(fake, None)  # `dbevents status` before the first run
    assert set(facts) == {"server_time"}
    assert "caught_up" not in await probe(fake, Position("binlog.000001:4"))  # another type's
    fake.first_kept = 2  # the checkpoint's place fell off the oplog
    facts = await probe(fake, token_position(token(1)))
    assert facts["caught_up"] is False and "lag_seconds" not in facts
    assert "oplog" in facts["resume"]
