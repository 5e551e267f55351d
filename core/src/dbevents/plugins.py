"""Finding and loading plugins: the ``dbevents`` entry-point group.

Names live in one registry per kind; two plugins that claim one name are an
error naming both distributions, rather than one silently shadowing the other.
Each registered class is checked against its kind's protocol, and the config
keys plugins declare against each other and the core's. Such problems do not
stop loading: ``dbevents plugins`` lists everything installed and marks them;
``Plugins.check()`` (every other command) raises them.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import os
from collections.abc import Iterable
from typing import Any, Literal, overload

import attrs
import pluggy
import structlog

from dbevents import hookspecs
from dbevents.errors import PluginError
from dbevents.protocols import (
    DATABASE_KEYS,
    TRIGGER_KEYS,
    Matcher,
    Observer,
    Service,
    Sink,
    Source,
    Store,
    options_class,
    status_probe,
    target_validator,
)
from dbevents.values import Operation

GROUP = "dbevents"
KINDS = ("source", "sink", "store", "matcher", "service", "observer")
Kind = Literal["source", "sink", "store", "matcher", "service", "observer"]
PROTOCOLS: dict[str, type] = {"source": Source, "sink": Sink, "store": Store,
                              "matcher": Matcher, "service": Service, "observer": Observer}
# Kinds whose protocol methods are each optional (an observer defines the moments it wants).
OPTIONAL_MEMBERS = ("observer",)
log = structlog.get_logger("dbevents.plugins")


@attrs.frozen
class PluginInfo:
    kind: str
    name: str
    obj: Any
    plugin: str  # the entry point's name
    distribution: str
    version: str
    # Why this registration cannot be used (a clash, a class that does not fit);
    # "" when it is fine. Only fine ones are in the registry.
    problem: str = ""

    def where(self) -> str:
        return f"{self.distribution} (entry point {self.plugin!r})"


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
        self.entries: list[PluginInfo] = []  # every registration, in order
        # Entry point names two distributions declare -> the message.
        self.clashes: dict[str, str] = {}
        self.claimed_twice: set[tuple[str, str]] = set()  # (kind, name)
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
            info = PluginInfo(kind, name, obj, plugin, dist, version)
            existing = self.registry[kind].get(name)
            if existing is not None and existing.obj is obj:
                return
            misfit = misfit_reason(kind, obj)
            if misfit:
                info = attrs.evolve(info, problem=(
                    f"the {kind} {name!r} from {info.where()} does not fit the "
                    f"{PROTOCOLS[kind].__name__} protocol: {misfit}"))
            elif existing is not None:
                self.claimed_twice.add((kind, name))
                info = attrs.evolve(info, problem=(
                    f"two plugins claim the {kind} name {name!r}: {existing.where()} and "
                    f"{info.where()}; uninstall one of them, or choose which load with "
                    "DBEVENTS_PLUGINS"))
            else:
                self.registry[kind][name] = info
            self.entries.append(info)

        return register

    # -- problems --------------------------------------------------------
    def key_conflicts(self) -> list[tuple[str, list[PluginInfo]]]:
        """Config keys that two plugins declare, or that a plugin declares over
        one of the core's: (message, the plugins involved)."""
        out: list[tuple[str, list[PluginInfo]]] = []
        sinks = [i for i in self.registry["sink"].values()]
        matchers = [i for i in self.registry["matcher"].values()]

        def keys(info: PluginInfo) -> list[str]:
            cls = options_class(info.obj)
            return [f.name for f in attrs.fields(cls)] if cls is not None else []

        for info in [*sinks, *matchers]:
            for key in keys(info):
                if key in TRIGGER_KEYS:
                    out.append((f"the {info.kind} {info.name!r} from {info.where()} declares "
                                f"the trigger key {key!r}, which the core reads itself; "
                                "rename the plugin's option", [info]))
        for info in self.registry["source"].values():
            for key in keys(info):
                if key in DATABASE_KEYS:
                    out.append((f"the source {info.name!r} from {info.where()} declares the "
                                f"database key {key!r}, which the core reads itself; rename "
                                "the plugin's option", [info]))
        # Any matcher's keys may sit in a trigger beside any sink's (two sinks
        # never share a trigger, so their keys may repeat).
        for i, a in enumerate(matchers):
            for b in [*matchers[i + 1:], *sinks]:
                for key in sorted(set(keys(a)) & set(keys(b))):
                    out.append((f"two plugins declare the trigger key {key!r}: the "
                                f"{b.kind} {b.name!r} from {b.where()} and the matcher "
                                f"{a.name!r} from {a.where()}; uninstall one of them, or "
                                "choose which load with DBEVENTS_PLUGINS", [a, b]))
        return out

    def problems(self) -> list[str]:
        return [*self.clashes.values(), *(i.problem for i in self.entries if i.problem),
                *(m for m, _ in self.key_conflicts())]

    def check(self) -> None:
        """Raise PluginError naming every problem, if there is one."""
        found = self.problems()
        if found:
            raise PluginError("; ".join(found))

    # -- lookup ----------------------------------------------------------
    @overload
    def get(self, kind: Literal["source"], name: str) -> type[Source]: ...
    @overload
    def get(self, kind: Literal["sink"], name: str) -> type[Sink]: ...
    @overload
    def get(self, kind: Literal["store"], name: str) -> type[Store]: ...
    @overload
    def get(self, kind: Literal["matcher"], name: str) -> type[Matcher]: ...
    @overload
    def get(self, kind: Literal["service"], name: str) -> type[Service]: ...
    @overload
    def get(self, kind: Literal["observer"], name: str) -> type[Observer]: ...
    @overload
    def get(self, kind: str, name: str) -> Any: ...
    def get(self, kind: str, name: str) -> Any:
        info = self.registry[kind].get(name)
        if info is None:
            raise KeyError(name)
        return info.obj

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry[kind])

    def all(self) -> list[PluginInfo]:
        """Every registration, usable or not, by kind and name."""
        return sorted(self.entries, key=lambda i: (KINDS.index(i.kind), i.name))

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
            # The same entry point name from two distributions: the second is not
            # loaded, and every command but `dbevents plugins` refuses to run.
            plugins.clashes[ep.name] = (
                f"two installed distributions declare the dbevents plugin {ep.name!r}: "
                f"{seen[ep.name]} and {dist}; uninstall one of them"
            )
            plugins.modules.append((None, ep.name, dist, version))
            continue
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


def misfit_reason(kind: str, obj: Any) -> str:
    """Why ``obj`` cannot serve as a ``kind`` plugin ("" when it can): a missing
    protocol member, or an optional capability of the wrong shape."""
    if not isinstance(obj, type):
        return f"expected a class, got {type(obj).__name__} {obj!r}"
    proto = PROTOCOLS[kind]
    names = set(getattr(proto, "__annotations__", {})) | {
        n for n, v in vars(proto).items() if not n.startswith("_") and callable(v)}
    missing = [] if kind in OPTIONAL_MEMBERS else sorted(n for n in names if not hasattr(obj, n))
    if missing:
        return f"{obj.__qualname__} has no {', '.join(missing)}"
    if getattr(obj, "Options", None) is not None and options_class(obj) is None:
        return f"{obj.__qualname__}.Options is not an attrs class"
    if kind == "source":
        ops = getattr(obj, "operations", None)
        if ops is not None and not (isinstance(ops, frozenset | set)
                                    and all(isinstance(o, Operation) for o in ops)):
            return f"{obj.__qualname__}.operations is not a frozenset of Operation"
        probe = status_probe(obj)
        if probe is not None and not inspect.iscoroutinefunction(probe):
            return f"{obj.__qualname__}.probe_status is not an async classmethod"
    if kind == "sink":
        check = target_validator(obj)
        if check is not None and not callable(check):
            return f"{obj.__qualname__}.validate_target is not callable"
    return ""


def module_from(name: str, **hooks: Any) -> object:
    """Build a plugin object from hook functions, for tests and embedding."""
    attrs_ = {k: staticmethod(hookspecs.hookimpl(v)) for k, v in hooks.items()}
    return type(name, (), attrs_)()
