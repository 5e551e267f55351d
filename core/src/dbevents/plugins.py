"""Finding and loading plugins: the ``dbevents`` entry-point group.

Names live in one registry per kind; two plugins that claim one name are an
error naming both distributions, rather than one silently shadowing the other.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from collections.abc import Iterable
from typing import Any

import attrs
import pluggy
import structlog

from dbevents import hookspecs
from dbevents.errors import PluginError

GROUP = "dbevents"
KINDS = ("source", "sink", "store", "matcher", "service")
log = structlog.get_logger("dbevents.plugins")


@attrs.frozen
class PluginInfo:
    kind: str
    name: str
    obj: Any
    plugin: str  # the entry point's name
    distribution: str
    version: str


@attrs.frozen
class LoadFailure:
    plugin: str
    distribution: str
    error: str


class Plugins:
    """Every loaded plugin, by kind and name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registry: dict[str, dict[str, PluginInfo]] = {k: {} for k in KINDS}
        self.failures: list[LoadFailure] = []
        self.modules: list[tuple[object, str, str, str]] = []

    # -- loading ---------------------------------------------------------
    def add(self, module: object, name: str, distribution: str = "", version: str = "") -> None:
        """Register one plugin module (or object) and collect what it registers."""
        self.pm.register(module, name=name)
        self.modules.append((module, name, distribution or name, version))
        others = [m for m, *_ in self.modules if m is not module]
        for kind in KINDS:
            hook = self.pm.subset_hook_caller(f"register_{kind}s", remove_plugins=others)
            hook(register=self._registrar(kind, name, distribution or name, version))

    def _registrar(self, kind: str, plugin: str, dist: str, version: str) -> Any:
        def register(name: str, obj: Any) -> None:
            existing = self.registry[kind].get(name)
            if existing is not None and existing.obj is not obj:
                raise PluginError(
                    f"two plugins claim the {kind} name {name!r}: "
                    f"{existing.distribution} (entry point {existing.plugin!r}) and "
                    f"{dist} (entry point {plugin!r}); uninstall one of them, or choose "
                    f"which load with DBEVENTS_PLUGINS"
                )
            self.registry[kind][name] = PluginInfo(kind, name, obj, plugin, dist, version)

        return register

    # -- lookup ----------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        info = self.registry[kind].get(name)
        if info is None:
            raise KeyError(name)
        return info.obj

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry[kind])

    def all(self) -> list[PluginInfo]:
        return [i for k in KINDS for i in sorted(self.registry[k].values(), key=lambda i: i.name)]

    def add_commands(self, cli: Any) -> None:
        self.pm.hook.register_commands(cli=cli)


def _wanted() -> set[str] | None:
    raw = os.environ.get("DBEVENTS_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def load(extra: Iterable[tuple[str, object]] = (), entry_points: bool = True) -> Plugins:
    """Load the installed plugins (restricted by ``DBEVENTS_PLUGINS=a,b``) plus
    ``extra`` (name, module) pairs. A plugin that fails to import is skipped with
    a warning naming it; the others still load."""
    plugins = Plugins()
    wanted = _wanted()
    for name, module in extra:
        plugins.add(module, name, distribution=name)
    if not entry_points:
        return plugins
    seen: dict[str, str] = {}  # entry point name -> its distribution
    for ep in sorted(md.entry_points(group=GROUP), key=lambda e: e.name):
        if wanted is not None and ep.name not in wanted:
            continue
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if ep.name in seen:
            # The same entry point name from two distributions.
            raise PluginError(
                f"two installed distributions declare the dbevents plugin {ep.name!r}: "
                f"{seen[ep.name]} and {dist}; uninstall one of them"
            )
        seen[ep.name] = dist
        try:
            module = ep.load()
        except Exception as exc:
            plugins.failures.append(LoadFailure(ep.name, dist, f"{type(exc).__name__}: {exc}"))
            log.warning(
                "plugin failed to load; skipped",
                plugin=ep.name,
                distribution=dist,
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        plugins.add(module, ep.name, distribution=dist, version=version)
    if wanted is not None:
        missing = wanted - set(seen)
        if missing:
            log.warning("DBEVENTS_PLUGINS names plugins that are not installed",
                        missing=sorted(missing))
    return plugins


def module_from(name: str, **hooks: Any) -> object:
    """Build a plugin object from hook functions, for tests and embedding."""
    attrs_ = {k: staticmethod(hookspecs.hookimpl(v)) for k, v in hooks.items()}
    return type(name, (), attrs_)()
