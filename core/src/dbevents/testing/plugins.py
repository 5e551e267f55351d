"""Plugin sets for tests, isolated from whatever else is installed, and the engine
run in-process on them."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator, Mapping

from dbevents import config as config_mod
from dbevents import plugins as plugins_mod
from dbevents.engine import Engine
from dbevents.testing.memory import MemoryPlugin


def isolated_plugins(*extra: tuple[str, object], memory: bool = True) -> plugins_mod.Plugins:
    """Only the given (name, plugin) pairs, plus the in-memory plugins; no entry points."""
    pairs = [("memory", MemoryPlugin()), *extra] if memory else list(extra)
    return plugins_mod.load(pairs, entry_points=False)


def parse_config(text: str, plugins: plugins_mod.Plugins,
                 environ: Mapping[str, str] | None = None) -> config_mod.Config:
    """A TOML config checked against ``plugins`` as `dbevents run` checks it
    (``environ`` fills ``${VAR}``; none by default). Raises ConfigError."""
    return config_mod.parse(tomllib.loads(text), plugins, dict(environ or {}))


@contextlib.asynccontextmanager
async def running(config: config_mod.Config, plugins: plugins_mod.Plugins
                  ) -> AsyncIterator[Engine]:
    """The engine running in this process for the duration of the block; then
    stopped, after the work in flight is finished. An engine that failed raises
    its error here."""
    engine = Engine(config, plugins)
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        engine.stop()
        await task
