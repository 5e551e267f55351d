"""The `slot`, `publication` and `publish_all` options, as the server sees them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dbevents_source_postgres.options import default_name

if TYPE_CHECKING:
    from plugins.sources.postgres.tests.conftest import PgEnv


async def test_slot_and_publication_overrides_are_the_names_on_the_server(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE other (id int PRIMARY KEY)")
    slot = f"custom_{pg.dbname[-12:]}"  # slots are server-wide: unique per test
    publication = 'My "pub" 1'  # any name, quoted wherever it is used
    source = await pg.started(tables=["t"], slot=slot, publication=publication)
    assert (source.slot, source.publication) == (slot, publication)
    assert pg.server.execute(
        "SELECT slot_name, plugin, slot_type FROM pg_replication_slots WHERE database = %s",
        (pg.dbname,)) == [(slot, "pgoutput", "logical")]
    assert pg.execute("SELECT pubname, puballtables FROM pg_publication") == [
        (publication, False)]
    assert pg.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = %s",
                      (publication,)) == [("t",)]

    reader = pg.reader(source)
    pg.execute("INSERT INTO other VALUES (1)")
    pg.execute("INSERT INTO t VALUES (1)")
    assert [(c.table, c.doc) for c in await reader.until(1)] == [("t", {"id": 1})]
    # Read through that slot (and no other was made under the default name).
    assert pg.slot(source)["active"] is True
    assert not pg.server.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                                 (default_name(pg.dbname),))


async def test_publish_all_makes_a_for_all_tables_publication(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = await pg.started(tables=["t"], publish_all=True)
    assert pg.execute("SELECT pubname, puballtables FROM pg_publication") == [
        (source.publication, True)]
    # Tables made later are published at once; only the watched ones become changes.
    pg.execute("CREATE TABLE later (id int PRIMARY KEY)")
    published = pg.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = %s"
                           " ORDER BY 1", (source.publication,))
    assert published == [("later",), ("t",)]
    reader = pg.reader(source)
    pg.execute("INSERT INTO later VALUES (1)")
    pg.execute("INSERT INTO t VALUES (2)")
    assert [(c.table, c.doc) for c in await reader.until(1)] == [("t", {"id": 2})]
