"""``dbevents postgres ...``: managing what the source leaves in PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, NoReturn

import click
import psycopg
from dbevents import Position
from dbevents.errors import DbeventsError
from dbevents.masking import mask_dsn

from dbevents_source_postgres import catalog
from dbevents_source_postgres.options import slot_name
from dbevents_source_postgres.source import PostgresSource


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _postgres_database(state: Any, database: str) -> Any:
    """The [databases.DATABASE] section, which must be a postgres one; else exit."""
    try:
        cfg = state.config
    except DbeventsError as exc:
        _fail(str(exc), exc.exit_code)
    db = cfg.databases.get(database)
    if db is None:
        _fail(f"no [databases.{database}] section in {cfg.path} "
              f"(defined: {', '.join(sorted(cfg.databases)) or 'none'})", 2)
    if state.plugins.get("source", db.type) is not PostgresSource:
        _fail(f"[databases.{database}] is of type {db.type!r}, not a postgres database", 2)
    return db


@click.group()
def postgres() -> None:
    """PostgreSQL source: replication slots."""


@postgres.command("drop-slot")
@click.argument("database")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def drop_slot(state: Any, database: str, yes: bool) -> None:
    """Drop the replication slot of the [databases.DATABASE] section.

    dbevents never drops a slot holding changes it has not confirmed. Without
    the slot PostgreSQL forgets what dbevents has read: changes made before the
    next start (which creates a new slot) are never captured. Stop dbevents first.
    """
    db = _postgres_database(state, database)
    slot = slot_name(database, db.options)
    where = mask_dsn(db.url)
    if not yes:
        click.confirm(
            f"Drop the replication slot {slot!r} on {where}? Changes made until dbevents "
            "creates a new one will not be captured.", abort=True)
    try:
        message = asyncio.run(_drop(db.url, slot, where))
    except psycopg.Error as exc:
        _fail(f"cannot drop the slot {slot!r} on {where}: {str(exc).strip()}")
    if message:
        _fail(message)
    click.echo(f"dropped the replication slot {slot!r} on {where}")


async def _drop(url: str, slot: str, where: str) -> str | None:
    conn = await catalog.connect(url, 10)
    try:
        info = await catalog.slot_info(conn, slot)
        if info is None:
            return f"there is no replication slot {slot!r} on {where}"
        if info.active:
            return (f"the replication slot {slot!r} is in use (PostgreSQL backend pid "
                    f"{info.active_pid}); stop the dbevents reading it first")
        await conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        return None
    finally:
        await conn.close()


@postgres.command("reset-position")
@click.argument("database")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def reset_position(state: Any, database: str, yes: bool) -> None:
    """Go on from now after the slot of [databases.DATABASE] was lost.

    Creates the slot if it is missing and moves the checkpoint in the eventing DB
    to the slot's position: changes made between the old checkpoint and now are
    not captured. Stop dbevents first.
    """
    db = _postgres_database(state, database)
    slot = slot_name(database, db.options)
    where = mask_dsn(db.url)
    if not yes:
        click.confirm(
            f"Move the checkpoint of {database!r} to the current position of the slot "
            f"{slot!r} on {where}? Changes made since the old checkpoint will not be "
            "captured.", abort=True)
    try:
        old, new = asyncio.run(_reset(state, database, db.url, slot))
    except psycopg.Error as exc:
        _fail(f"cannot reach {where}: {str(exc).strip()}")
    except DbeventsError as exc:
        _fail(str(exc), exc.exit_code)
    click.echo(f"checkpoint of {database!r}: {old or 'none'} -> {new}")


async def _reset(state: Any, database: str, url: str, slot: str) -> tuple[str | None, str]:
    conn = await catalog.connect(url, 10)
    try:
        info = await catalog.slot_info(conn, slot)
        if info is None:
            await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                               (slot,))
            info = await catalog.slot_info(conn, slot)
        assert info is not None and info.confirmed_flush is not None
        if info.active:
            raise DbeventsError(f"the replication slot {slot!r} is in use (PostgreSQL backend "
                                f"pid {info.active_pid}); stop dbevents first")
        position = info.confirmed_flush
    finally:
        await conn.close()
    store = state.store()
    await store.open()
    try:
        old = await store.checkpoint(database)
        await store.enqueue([], {database: Position(position)})
    finally:
        await store.close()
    return (old.value if old else None), position
