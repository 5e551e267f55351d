"""Startup checks: each misconfiguration is a SetupError (exit code 2) that names
the fix, or a warning where capture can go on."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import pytest
from dbevents import SetupError, SourceSettings
from dbevents_source_postgres import PostgresSource
from structlog.testing import capture_logs

from testsupport.servers import PostgresServer

if TYPE_CHECKING:
    from plugins.sources.postgres.tests.conftest import PgEnv


def test_setup_errors_exit_with_2() -> None:
    assert SetupError.exit_code == 2


async def test_wal_level_must_be_logical() -> None:
    with PostgresServer({"wal_level": "replica"}) as server:
        server.execute("CREATE TABLE t (id int PRIMARY KEY)")
        source = PostgresSource(SourceSettings(name="app", url=server.dsn(), options=None))
        try:
            with pytest.raises(SetupError, match=r"wal_level = replica.*ALTER SYSTEM SET "
                                                 r"wal_level = logical.*restart"):
                await source.start()
        finally:
            await source.close()


async def test_the_role_needs_replication(pg: PgEnv, role: str) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = pg.source(tables=["t"], url=pg.server.dsn(pg.dbname, user=role))
    with pytest.raises(SetupError, match=f"lacks the REPLICATION attribute.*ALTER ROLE {role} "
                                         "WITH REPLICATION"):
        await source.start()


async def test_the_role_needs_select_on_watched_tables(pg: PgEnv, role: str) -> None:
    pg.server.execute(f"ALTER ROLE {role} WITH REPLICATION")
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE open_one (id int PRIMARY KEY)")
    pg.execute(f"GRANT SELECT ON open_one TO {role}")
    source = pg.source(tables=["t", "open_one"], url=pg.server.dsn(pg.dbname, user=role))
    with pytest.raises(SetupError, match=f"GRANT SELECT ON public.t TO {role}") as err:
        await source.start()
    assert "open_one" not in str(err.value)


async def test_a_role_that_may_not_create_the_publication_is_told_what_to_run(
        pg: PgEnv, role: str) -> None:
    pg.server.execute(f"ALTER ROLE {role} WITH REPLICATION")
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute(f"GRANT SELECT ON t TO {role}")
    source = pg.source(tables=["t"], url=pg.server.dsn(pg.dbname, user=role))
    with pytest.raises(SetupError, match=r"may not run CREATE PUBLICATION \w+ FOR TABLE "
                                         r"public.t"):
        await source.start()
    # Created by someone who may, the same role starts fine.
    pg.execute(f"CREATE PUBLICATION {source.publication} FOR TABLE t")
    await source.start()


async def test_a_slot_in_use_by_another_process(pg: PgEnv,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PostgresSource, "slot_release_wait", 0.2)
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    first = await pg.started(tables=["t"])
    holder = await psycopg.AsyncConnection.connect(pg.url, replication="database",
                                                   autocommit=True)
    try:
        await holder.execute(f"START_REPLICATION SLOT {first.slot} LOGICAL 0/0 "
                             f"(proto_version '1', publication_names '{first.publication}')")
        pid = holder.info.backend_pid
        second = pg.source(tables=["t"])
        with pytest.raises(SetupError, match=f"in use by another process .*pid {pid}"):
            await second.start()
    finally:
        await holder.close()


async def test_a_slot_of_another_output_plugin(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = pg.source(tables=["t"])
    pg.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (source.slot,))
    with pytest.raises(SetupError, match=r"output plugin 'test_decoding'.*drop-slot"):
        await source.start()


async def test_a_table_without_a_primary_key_is_a_warning(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE keyless (body text)")
    pg.execute("ALTER TABLE keyless REPLICA IDENTITY FULL")
    pg.execute("CREATE TABLE keyed (id int PRIMARY KEY)")
    with capture_logs() as logs:
        source = await pg.started(tables=["keyless", "keyed"])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["table"] for e in warnings] == ["keyless"]
    assert "no primary key" in warnings[0]["event"] and "docId = null" in warnings[0]["event"]
    assert "ADD PRIMARY KEY" in warnings[0]["fix"]
    pg.execute("INSERT INTO keyless VALUES ('x')")
    [change] = await pg.reader(source).until(1)
    assert change.doc == {"body": "x"} and change.doc_id is None


async def test_publication_must_publish_the_operations_triggers_need(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    source = pg.source(tables=["t"], operations=["insert", "update"])
    pg.execute(f"CREATE PUBLICATION {source.publication} FOR TABLE t WITH (publish = 'insert')")
    with pytest.raises(SetupError, match=r"does not publish update.*ALTER PUBLICATION"):
        await source.start()


async def test_an_existing_publication_gets_newly_watched_tables(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY)")
    first = await pg.started(tables=["a"])
    await first.close()
    second = await pg.started(tables=["a", "b"])
    published = pg.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = %s"
                           " ORDER BY 1", (second.publication,))
    assert published == [("a",), ("b",)]
    pg.execute("INSERT INTO b VALUES (1)")
    [change] = await pg.reader(second).until(1)
    assert change.table == "b"


async def test_all_tables_need_a_publication_for_all_tables(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY)")
    narrow = await pg.started(tables=["a"])
    await narrow.close()
    every = pg.source(tables=None)
    with pytest.raises(SetupError, match=r"lists tables.*DROP PUBLICATION"):
        await every.start()


async def test_watched_tables_that_do_not_exist(pg: PgEnv) -> None:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY)")
    with capture_logs() as logs:
        await pg.started(tables=["a", "elsewhere"])
    assert any(e.get("table") == "elsewhere" and e["log_level"] == "warning" for e in logs)
    none_here = pg.source(tables=["elsewhere"], name="other")
    with pytest.raises(SetupError, match="none of the tables"):
        await none_here.start()


async def test_an_unreachable_server_is_named_without_its_password(pg: PgEnv) -> None:
    source = pg.source(url="postgresql://app:s3cret@127.0.0.1:1/nowhere", connect_timeout=2)
    with pytest.raises(SetupError, match=r"postgresql://app:\*\*\*@127.0.0.1:1/nowhere") as err:
        await source.start()
    assert "s3cret" not in str(err.value)


async def test_a_keyless_table_under_a_publication_names_the_consequence_and_the_fix(
        pg: PgEnv) -> None:
    """No key, default replica identity, every table watched (FOR ALL TABLES): the
    warning says PostgreSQL now refuses the application's UPDATE and DELETE, and
    how to fix it; and that is what PostgreSQL does."""
    pg.execute("CREATE TABLE loose (body text)")
    pg.execute("INSERT INTO loose VALUES ('x')")
    with capture_logs() as logs:
        await pg.started(tables=None)
    [warning] = [e for e in logs if e["log_level"] == "warning" and e.get("table") == "loose"]
    assert "refuses every UPDATE and DELETE" in warning["event"]
    assert "REPLICA IDENTITY FULL" in warning["fix"] and "`tables`" in warning["fix"]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match="does not have a replica identity"):
        pg.execute("UPDATE loose SET body = 'y'")
    pg.execute("ALTER TABLE loose REPLICA IDENTITY FULL")  # the fix the warning gives
    pg.execute("UPDATE loose SET body = 'y'")
