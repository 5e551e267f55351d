"""How far behind the binlog a checkpoint is: the status probe's bytes between a
checkpoint and the server's binlog end, and an idle reader whose checkpoint
follows the end (past a rotation too)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dbevents import Position
from dbevents_source_mysql import MysqlSource
from dbevents_source_mysql.position import BinlogPosition

TIMEOUT = 20.0


def server_end(env: Any) -> BinlogPosition:
    file, pos = env.server.execute("SHOW MASTER STATUS")[0][:2]
    return BinlogPosition(str(file), int(pos))


def settled_end(env: Any) -> BinlogPosition:
    """The binlog end once MariaDB has written the binlog checkpoint event of the
    current file, which it adds some moments after a rotation (and which would
    otherwise land in the middle of a measurement)."""
    for _ in range(int(TIMEOUT / 0.05)):
        end = server_end(env)
        rows = env.server.execute(f"SHOW BINLOG EVENTS IN '{end.file}'")
        if any(r[2] == "Binlog_checkpoint" and r[5] == end.file for r in rows):
            return server_end(env)
        time.sleep(0.05)
    raise AssertionError("no binlog checkpoint event in the current binlog file")


async def probe(env: Any, checkpoint: str | None) -> dict[str, Any]:
    settings = env.settings()
    if checkpoint is not None:
        settings = type(settings)(name=settings.name, url=settings.url,
                                  options=settings.options, checkpoint=Position(checkpoint))
    return dict(await MysqlSource.probe_status(settings))


async def test_probe_counts_the_binlog_bytes_after_the_checkpoint(mysql_env: Any) -> None:
    start = settled_end(mysql_env)
    facts = await probe(mysql_env, str(start))
    assert facts["lag_bytes"] == 0 and facts["caught_up"] is True
    assert facts["server_position"] == str(start)

    mysql_env.execute("INSERT INTO items (name) VALUES ('a'), ('b')")
    end = server_end(mysql_env)
    assert end.file == start.file and end.pos > start.pos
    facts = await probe(mysql_env, str(start))
    assert facts["lag_bytes"] == end.pos - start.pos and facts["caught_up"] is False
    # A checkpoint carrying the GTID of its transaction counts by file and offset.
    facts = await probe(mysql_env, f"{start} gtid=0-1-999")
    assert facts["lag_bytes"] == end.pos - start.pos

    # Across a rotation: the rest of the old file, then the new one up to the end.
    mysql_env.execute("FLUSH BINARY LOGS")
    settled_end(mysql_env)
    mysql_env.execute("INSERT INTO items (name) VALUES ('c')")
    later = server_end(mysql_env)
    assert later.file != start.file
    sizes = {str(r[0]): int(r[1]) for r in mysql_env.execute("SHOW BINARY LOGS")}
    names = list(sizes)
    between = names[names.index(start.file) + 1:names.index(later.file)]
    expected = sizes[start.file] - start.pos + sum(sizes[n] for n in between) + later.pos
    facts = await probe(mysql_env, str(start))
    assert facts["lag_bytes"] == expected and facts["caught_up"] is False
    assert (await probe(mysql_env, str(later)))["lag_bytes"] == 0


async def test_probe_without_a_usable_checkpoint(mysql_env: Any) -> None:
    facts = await probe(mysql_env, None)  # `dbevents status` before the first run
    assert "lag_bytes" not in facts and "caught_up" not in facts
    assert facts["server_position"] == str(server_end(mysql_env))
    # A binlog file the server no longer has: behind, by an amount nobody can tell.
    facts = await probe(mysql_env, "gone-bin.000001:4")
    assert facts["caught_up"] is False and "lag_bytes" not in facts
    # Another source type's checkpoint: no lag (the reader itself refuses it).
    assert "lag_bytes" not in await probe(mysql_env, "0/16B3748")


async def test_an_idle_reader_checkpoints_the_binlog_end_past_a_rotation(
        mysql_env: Any, reading: Any) -> None:
    r = await reading(mysql_env.make_source(heartbeat=0.2))
    mysql_env.execute("INSERT INTO items (name) VALUES ('a')")
    await r.wait_for(1)
    old = server_end(mysql_env)
    mysql_env.execute("FLUSH BINARY LOGS")  # a new file, and no transaction after it
    # (MariaDB may still add a binlog checkpoint event to it: the end is read anew.)

    async def until_caught_up() -> dict[str, Any]:
        while True:
            at = r.checkpoint
            if at is not None and BinlogPosition.from_position(at).file != old.file:
                facts = await probe(mysql_env, at.value)
                if facts["lag_bytes"] == 0:
                    return facts
            await asyncio.sleep(0.05)

    facts = await asyncio.wait_for(until_caught_up(), TIMEOUT)
    assert facts["caught_up"] is True
    assert r.checkpoint is not None
    assert r.checkpoint.value == facts["server_position"]
    # Reading on from there loses nothing, and neither does resuming there.
    resume_at = r.checkpoint
    mysql_env.execute("INSERT INTO items (name) VALUES ('b')")
    changes = await r.wait_for(2)
    assert [c.doc["name"] for c in changes if c.doc] == ["a", "b"]
    again = await reading(mysql_env.make_source(), since=resume_at)
    assert [c.doc["name"] for c in await again.wait_for(1) if c.doc] == ["b"]
