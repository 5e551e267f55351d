"""``dbevents mongodb ...``: the way back after the change stream's history is lost."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
from dbevents import DbeventsError, Position, SetupError, SourceSettings
from dbevents.hints import command

from dbevents_source_mongodb.source import MongoSource


@click.group("mongodb")
def mongodb() -> None:
    """Commands of the MongoDB source."""


@mongodb.command("reset-token")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def reset_token(state: Any, name: str, yes: bool) -> None:
    """Restart database NAME from now.

    Moves NAME's checkpoint in the eventing DB to the current resume token of its
    change stream. Every change made between the old checkpoint and now is skipped
    for good: use it after "can no longer resume its change stream" (the token fell
    off the oplog), when those changes are lost anyway. Stop `dbevents run` first.
    """
    try:
        cfg = state.config
        db = cfg.databases.get(name)
        if db is None:
            raise SetupError(f"no database {name!r} in the config "
                             f"(databases: {', '.join(sorted(cfg.databases)) or 'none'})")
        if state.plugins.get("source", db.type) is not MongoSource:
            raise SetupError(f"database {name!r} has type {db.type!r}, not a MongoDB source")
    except DbeventsError as exc:
        _fail(exc)
        return
    if not yes:
        click.confirm(f"Move the checkpoint of {name!r} to now? Changes made since the "
                      f"current checkpoint will never be delivered", abort=True)
    settings = SourceSettings(name=name, url=db.url, options=db.options,
                              config_dir=cfg.dir)
    try:
        old, new = asyncio.run(_reset(state, settings))
    except DbeventsError as exc:
        _fail(exc)
        return
    click.echo(f"{name}: checkpoint moved from {old or '(none)'} to {new} (now)")
    click.echo(f"Start `{command('run')}` again; it reads changes made from now on.")


async def _reset(state: Any, settings: SourceSettings) -> tuple[Position | None, Position]:
    source = MongoSource(settings)
    try:
        await source.start()
        new = await source.current_position()
    finally:
        await source.close()
    store = state.store()
    await store.open()
    try:
        old = await store.checkpoint(settings.name)
        # No events, one checkpoint: the store's own transaction moves it.
        await store.enqueue([], {settings.name: new})
    finally:
        await store.close()
    return old, new


def _fail(exc: DbeventsError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)
