"""Plugin sets for tests, isolated from whatever else is installed."""

from __future__ import annotations

from dbevents import plugins as plugins_mod
from dbevents.testing.memory import MemoryPlugin


def isolated_plugins(*extra: tuple[str, object], memory: bool = True) -> plugins_mod.Plugins:
    """Only the given (name, plugin) pairs, plus the in-memory plugins; no entry points."""
    pairs = [("memory", MemoryPlugin()), *extra] if memory else list(extra)
    return plugins_mod.load(pairs, entry_points=False)
