"""A checkpoint exists but the slot is gone (dropped, or a restored database):
dbevents refuses to go on silently from now, and `dbevents postgres
reset-position` is the explicit way on."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from dbevents import SetupError

if TYPE_CHECKING:
    from plugins.sources.postgres.tests.conftest import PgEnv


async def test_missing_slot_with_a_checkpoint_is_refused_then_reset(pg: PgEnv,
                                                                    tmp_path: Path) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    first = await pg.started()
    reader = pg.reader(first)
    pg.execute("INSERT INTO t VALUES (1)")
    await reader.until(1, confirm=True)
    checkpoint = reader.checkpoints[-1]
    await reader.close()
    await first.close()

    await asyncio.to_thread(pg.wait_slot_released, first.slot)  # released after the close
    pg.server.execute("SELECT pg_drop_replication_slot(%s)", (first.slot,))
    pg.execute("INSERT INTO t VALUES (2)")  # made while no slot kept changes

    second = await pg.started()
    with pytest.raises(SetupError, match="reset-position") as err:
        await pg.reader(second, checkpoint).next_batch()
    assert "was missing" in str(err.value)
    assert pg.slot(second) == {}  # dropped again: the next start refuses again too
    await second.close()

    # The explicit way on: a checkpoint at the new slot's position.
    config = tmp_path / "dbevents.toml"
    config.write_text(f'[eventing]\nstore = "sqlite:///events.db"\n'
                      f'[databases.{pg.dbname}]\ntype = "postgres"\nurl = "{pg.url}"\n')
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dbevents.cli", "--config", str(config), "postgres",
         "reset-position", pg.dbname, "--yes"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"checkpoint of {pg.dbname!r}: none -> " in out.stdout
    new_position = out.stdout.strip().rsplit(" ", 1)[1]

    third = await pg.started()
    reader = pg.reader(third, type(checkpoint)(new_position))
    pg.execute("INSERT INTO t VALUES (3)")
    changes = await reader.until(1)
    assert [c.doc for c in changes] == [{"id": 3}]  # on from now; row 2 was not kept
