"""The TOML config, validated up front into attrs values.

Every error names the key path (``triggers[1].timeout``) and the file, and the
launcher exits 2 without starting anything. Plugins describe the keys they add
with an attrs ``Options`` class; this module checks raw values against it.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import attrs

from dbevents.durations import parse_duration
from dbevents.errors import ConfigError
from dbevents.plugins import Plugins
from dbevents.protocols import (
    DATABASE_KEYS,
    TRIGGER_KEYS,
    options_class,
    source_operations,
    target_validator,
)
from dbevents.urls import normalize_userinfo
from dbevents.values import DEFAULT_OPERATIONS, Operation, Trigger

DEFAULT_STORE = "sqlite:///dbevents.db"
DEFAULT_FILE = "dbevents.toml"
_ENV_RE = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


@attrs.frozen
class EventingConfig:
    enabled: bool = True
    store: str = DEFAULT_STORE
    source_id: str | None = None
    retention: float = 7 * 86400.0  # seconds
    # How long a capture lease lasts unrenewed: the bound on a standby's takeover
    # (stores that keep leases only).
    capture_lease: float = 10.0  # seconds


@attrs.frozen
class DatabaseConfig:
    name: str
    type: str
    url: str
    options: Any = None


@attrs.frozen
class Config:
    eventing: EventingConfig
    databases: Mapping[str, DatabaseConfig]
    triggers: tuple[Trigger, ...]
    path: Path | None = None
    # The tables of registered services present in the file: name -> its Options.
    services: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """--config, else $DBEVENTS_CONFIG, else ./dbevents.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DBEVENTS_CONFIG")
    return Path(env) if env else Path(DEFAULT_FILE)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "config file not found; pass --config PATH, set DBEVENTS_CONFIG, "
            "or create ./dbevents.toml",
            source=str(path),
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc.strerror}",
                          source=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("the config file is not UTF-8 text", source=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message already says "(at line L, column C)".
        raise ConfigError(f"TOML syntax error: {exc}", source=str(path)) from None


def interpolate(value: Any, path: str, environ: Mapping[str, str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; $$ is a literal $."""
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            if m.group(1) == "$":
                return "$"
            name, default = m.group(2), m.group(3)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"environment variable {name} is not set and has no default "
                f"(write ${{{name}:-default}} to give one)",
                path=path,
            )

        return _ENV_RE.sub(repl, value)
    if isinstance(value, dict):
        return {k: interpolate(v, _join(path, k), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]", environ) for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return f"{path}.{key}" if path else key
    return f'{path}."{key}"' if path else f'"{key}"'


def _unknown(key: str, known: typing.Iterable[str], path: str, what: str) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown key {key!r} in {what}{hint} (known keys: {', '.join(known)})",
        path=_join(path, key),
    )


def _type_name(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


# -- structuring plugin Options classes ------------------------------------

def structure(cls: type, raw: Mapping[str, Any], path: str, what: str) -> Any:
    """Build an attrs ``cls`` from raw TOML values, with errors naming the key."""
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise _unknown(key, fields, path, what)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is attrs.NOTHING:
                raise ConfigError(f"required key {name!r} is missing", path=_join(path, name))
            continue
        kwargs[name] = coerce(hints[name], raw[name], _join(path, name))
    # Validators run one field at a time, so an error names that field's key
    # (attrs' own messages do not always carry the attribute).
    try:
        with attrs.validators.disabled():
            obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(_message(exc), path=path) from None
    for name, f in fields.items():
        if f.validator is None:
            continue
        try:
            f.validator(obj, f, getattr(obj, name))
        except (ValueError, TypeError) as exc:
            raise ConfigError(_message(exc), path=_join(path, name)) from None
    return obj


def _message(exc: Exception) -> str:
    # attrs raises TypeError(message, attribute, type, value): the message alone.
    first = exc.args[0] if exc.args else ""
    return first if isinstance(first, str) and first else str(exc)


def coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp``; convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(" or ".join(errors) or "invalid value", path=path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {_type_name(value)}", path=path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"expected an integer, got {_type_name(value)} {value!r}", path=path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {_type_name(value)} {value!r}", path=path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_type_name(value)} {value!r}", path=path)
        return value
    if origin in (list, tuple, frozenset, set):
        (arg, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {_type_name(value)} {value!r}", path=path)
        items = [coerce(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else (frozenset(items) if origin is frozenset
                                                      else items)
    if origin in (dict, Mapping) or tp is dict:
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {_type_name(value)} {value!r}", path=path)
        return {k: coerce(vt, v, _join(path, k)) for k, v in value.items()}
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table, got {_type_name(value)}", path=path)
        return structure(tp, value, path, "this table")
    return value


# -- the config itself -------------------------------------------------------

_EVENTING_KEYS = ("enabled", "store", "source_id", "retention", "capture_lease")
_DATABASE_KEYS = DATABASE_KEYS
_TRIGGER_KEYS = TRIGGER_KEYS


def load(path: Path, plugins: Plugins, environ: Mapping[str, str] | None = None) -> Config:
    raw = read_toml(path)
    try:
        return parse(raw, plugins, environ, path=path)
    except ConfigError as exc:
        exc.source = str(path)
        raise ConfigError(exc.message, exc.path, str(path)) from None


def parse(raw: Mapping[str, Any], plugins: Plugins, environ: Mapping[str, str] | None = None,
          path: Path | None = None) -> Config:
    plugins.check()
    environ = os.environ if environ is None else environ
    data = interpolate(dict(raw), "", environ)
    known = ("eventing", "databases", "triggers", *plugins.names("service"))
    for key in data:
        if key not in known:
            raise _unknown(key, known, "", "the config")
    eventing = _eventing(_table(data.get("eventing", {}), "eventing"), path)
    databases = _databases(_table(data.get("databases", {}), "databases"), plugins)
    triggers = _triggers(data.get("triggers", []), databases, plugins)
    services = {name: _service(name, _table(data[name], _join("", name)), plugins)
                for name in plugins.names("service") if name in data}
    return Config(eventing=eventing, databases=databases, triggers=triggers, path=path,
                  services=services)


def _service(name: str, raw: dict[str, Any], plugins: Plugins) -> Any:
    cls = options_class(plugins.get("service", name))
    if cls is None:
        if raw:
            raise _unknown(next(iter(raw)), (), name, f"[{name}]")
        return None
    return structure(cls, raw, name, f"[{name}]")


def _table(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"expected a table, got {_type_name(value)}", path=path)
    return value


def _eventing(raw: dict[str, Any], path: Path | None) -> EventingConfig:
    for key in raw:
        if key not in _EVENTING_KEYS:
            raise _unknown(key, _EVENTING_KEYS, "eventing", "[eventing]")
    enabled = coerce(bool, raw.get("enabled", True), "eventing.enabled")
    store = coerce(str, raw.get("store", DEFAULT_STORE), "eventing.store")
    if "://" not in store:
        raise ConfigError(
            f"expected a URL such as 'sqlite:///dbevents.db' or 'postgresql://...', got {store!r}",
            path="eventing.store",
        )
    store = normalize_userinfo(store, "eventing.store")
    source_id = raw.get("source_id")
    if source_id is not None:
        source_id = coerce(str, source_id, "eventing.source_id")
        if not source_id:
            raise ConfigError("must not be empty", path="eventing.source_id")
    retention_raw = raw.get("retention", "7d")
    try:
        retention = parse_duration(retention_raw)
    except ValueError as exc:
        raise ConfigError(str(exc), path="eventing.retention") from None
    try:
        capture_lease = parse_duration(raw.get("capture_lease", "10s"))
    except ValueError as exc:
        raise ConfigError(str(exc), path="eventing.capture_lease") from None
    if capture_lease < 1.0:
        raise ConfigError("must be at least 1s: the holder renews it every third of it",
                          path="eventing.capture_lease")
    return EventingConfig(enabled=enabled, store=store, source_id=source_id, retention=retention,
                          capture_lease=capture_lease)


# Names users often write for a database type, and the source that reads it.
_TYPE_ALIASES = {"postgresql": "postgres", "pg": "postgres", "pgsql": "postgres",
                 "psql": "postgres", "mariadb": "mysql", "maria": "mysql",
                 "mongo": "mongodb"}


def _type_suggestion(type_: str, installed: typing.Sequence[str]) -> str | None:
    alias = _TYPE_ALIASES.get(type_.lower())
    if alias in installed:
        return alias
    close = difflib.get_close_matches(type_.lower(), installed, n=1, cutoff=0.6)
    return close[0] if close else None


def _databases(raw: dict[str, Any], plugins: Plugins) -> dict[str, DatabaseConfig]:
    out = {}
    for name, table in raw.items():
        p = _join("databases", name)
        table = _table(table, p)
        if "type" not in table:
            raise ConfigError(
                f"required key 'type' is missing (installed sources: "
                f"{', '.join(plugins.names('source')) or 'none'})",
                path=_join(p, "type"),
            )
        type_ = coerce(str, table["type"], _join(p, "type"))
        try:
            source = plugins.get("source", type_)
        except KeyError:
            installed = plugins.names("source")
            close = _type_suggestion(type_, installed)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigError(
                f"unknown database type {type_!r}{hint}; installed source plugins: "
                f"{', '.join(installed) or 'none'}",
                path=_join(p, "type"),
            ) from None
        if "url" not in table:
            raise ConfigError("required key 'url' is missing", path=_join(p, "url"))
        url = normalize_userinfo(coerce(str, table["url"], _join(p, "url")), _join(p, "url"))
        extra = {k: v for k, v in table.items() if k not in _DATABASE_KEYS}
        cls = options_class(source)
        if cls is None:
            if extra:
                raise _unknown(next(iter(extra)), _DATABASE_KEYS, p,
                               f"a {type_} database")
            options = None
        else:
            known = set(_DATABASE_KEYS) | {f.name for f in attrs.fields(cls)}
            for key in extra:
                if key not in known:
                    raise _unknown(key, known, p, f"a {type_} database")
            options = structure(cls, extra, p, f"a {type_} database")
        out[name] = DatabaseConfig(name=name, type=type_, url=url, options=options)
    return out


def _str_or_list(value: Any, path: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(
            f"expected a string or a list of strings, got {_type_name(value)}", path=path)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"expected a string, got {_type_name(item)}", path=f"{path}[{i}]")
    return value


def _emits(db: DatabaseConfig, plugins: Plugins) -> frozenset[Operation]:
    """The operations the source of ``db`` can emit (all, unless it says)."""
    try:
        source = plugins.get("source", db.type)
    except KeyError:
        return frozenset(Operation)
    return source_operations(source)


def _check_operations(operations: frozenset[Operation], dbs: frozenset[str] | None,
                      databases: Mapping[str, DatabaseConfig], plugins: Plugins,
                      path: str) -> None:
    """An operation none of the trigger's databases can emit would never fire."""
    watched = [databases[d] for d in sorted(dbs)] if dbs is not None else \
        list(databases.values())
    if not watched:
        return
    for op in sorted(operations, key=lambda o: o.value):
        unable = [db for db in watched if op not in _emits(db, plugins)]
        if dbs is not None and unable:
            db = unable[0]
            raise ConfigError(
                f"{op.value!r}: the database {db.name!r} (type {db.type!r}) never emits "
                f"{op.value} events; remove it from operations or from databases", path=path)
        if dbs is None and len(unable) == len(watched):
            raise ConfigError(
                f"{op.value!r}: none of the databases (types "
                f"{', '.join(sorted({db.type for db in watched}))}) emits {op.value} events",
                path=path)


def _triggers(raw: Any, databases: Mapping[str, DatabaseConfig],
              plugins: Plugins) -> tuple[Trigger, ...]:
    if not isinstance(raw, list):
        raise ConfigError("expected an array of tables ([[triggers]])", path="triggers")
    matcher_keys: dict[str, tuple[str, type]] = {}
    for mname in plugins.names("matcher"):
        cls = options_class(plugins.get("matcher", mname))
        if cls is not None:
            for f in attrs.fields(cls):
                matcher_keys[f.name] = (mname, cls)
    seen: dict[str, int] = {}
    out = []
    for i, table in enumerate(raw):
        p = f"triggers[{i}]"
        table = _table(table, p)
        sink_name = coerce(str, table.get("sink", "webhook"), f"{p}.sink")
        try:
            sink = plugins.get("sink", sink_name)
        except KeyError:
            raise ConfigError(
                f"unknown sink {sink_name!r}; installed sink plugins: "
                f"{', '.join(plugins.names('sink')) or 'none'}",
                path=f"{p}.sink",
            ) from None
        sink_cls = options_class(sink)
        sink_keys = {f.name for f in attrs.fields(sink_cls)} if sink_cls else set()
        known = set(_TRIGGER_KEYS) | sink_keys | set(matcher_keys)
        for key in table:
            if key not in known:
                raise _unknown(key, known, p, "a trigger")
        if "name" not in table:
            raise ConfigError("required key 'name' is missing", path=f"{p}.name")
        name = coerce(str, table["name"], f"{p}.name")
        if not name:
            raise ConfigError("must not be empty", path=f"{p}.name")
        if name in seen:
            raise ConfigError(
                f"duplicate trigger name {name!r} (also used by triggers[{seen[name]}]); "
                "trigger names must be unique", path=f"{p}.name")
        seen[name] = i
        source = coerce(str, table.get("source", "database"), f"{p}.source")
        if source != "database":
            raise ConfigError(f"unknown event source {source!r}; the only one is 'database'",
                              path=f"{p}.source")
        dbs = None
        if "databases" in table:
            dbs = frozenset(_str_or_list(table["databases"], f"{p}.databases"))
            for j, db in enumerate(table["databases"] if isinstance(table["databases"], list)
                                   else [table["databases"]]):
                if db not in databases:
                    raise ConfigError(
                        f"names the database {db!r}, which no [databases.{db}] section defines"
                        f" (defined: {', '.join(sorted(databases)) or 'none'})",
                        path=f"{p}.databases" + (f"[{j}]" if isinstance(table["databases"], list)
                                                  else ""),
                    )
        tables = None
        if "tables" in table:
            tables = frozenset(_str_or_list(table["tables"], f"{p}.tables"))
        operations = DEFAULT_OPERATIONS
        if "operations" in table:
            ops = []
            for j, op in enumerate(_str_or_list(table["operations"], f"{p}.operations")):
                try:
                    ops.append(Operation(op.strip().lower()))
                except ValueError:
                    raise ConfigError(
                        f"unknown operation {op!r}; choose from insert, update, delete, truncate",
                        path=f"{p}.operations[{j}]" if isinstance(table["operations"], list)
                        else f"{p}.operations",
                    ) from None
            if not ops:
                raise ConfigError("must name at least one operation", path=f"{p}.operations")
            operations = frozenset(ops)
            _check_operations(operations, dbs, databases, plugins, f"{p}.operations")
        if "url" not in table:
            raise ConfigError("required key 'url' is missing", path=f"{p}.url")
        url = coerce(str, table["url"], f"{p}.url")
        retries = coerce(int, table.get("retries", 3), f"{p}.retries")
        if retries < 0:
            raise ConfigError(f"must be 0 or more, got {retries}", path=f"{p}.retries")
        timeout = coerce(int, table.get("timeout", 5000), f"{p}.timeout")
        if timeout <= 0:
            raise ConfigError(f"milliseconds, must be above 0, got {timeout}", path=f"{p}.timeout")
        concurrency = coerce(int, table.get("concurrency", 16), f"{p}.concurrency")
        if concurrency < 1:
            raise ConfigError(f"must be 1 or more, got {concurrency}", path=f"{p}.concurrency")
        backoff_base = coerce(int, table.get("backoff_base", 1000), f"{p}.backoff_base")
        backoff_max = coerce(int, table.get("backoff_max", 60000), f"{p}.backoff_max")
        if backoff_base < 0 or backoff_max < backoff_base:
            raise ConfigError(
                f"milliseconds, need 0 <= backoff_base <= backoff_max, got {backoff_base} and "
                f"{backoff_max}", path=f"{p}.backoff_max")
        backoff_factor = coerce(float, table.get("backoff_factor", 10.0), f"{p}.backoff_factor")
        if not 1.0 <= backoff_factor <= 100.0:
            raise ConfigError(f"must be between 1 and 100, got {backoff_factor:g}",
                              path=f"{p}.backoff_factor")
        pause_after = coerce(int, table.get("pause_after", 5), f"{p}.pause_after")
        if pause_after < 0 or pause_after == 1:
            raise ConfigError(f"must be 0 (never pause) or 2 or more, got {pause_after}",
                              path=f"{p}.pause_after")
        probe_max = coerce(int, table.get("probe_max", 10000), f"{p}.probe_max")
        if probe_max <= 0:
            raise ConfigError(f"milliseconds, must be above 0, got {probe_max}",
                              path=f"{p}.probe_max")
        sink_raw = {k: v for k, v in table.items() if k in sink_keys}
        sink_options = structure(sink_cls, sink_raw, p, "a trigger") if sink_cls else None
        validate = target_validator(sink)
        if validate is not None:
            try:
                validate(url, sink_options)
            except ValueError as exc:
                raise ConfigError(f"{exc} (trigger {name!r}, sink {sink_name!r})",
                                  path=f"{p}.url") from None
        matcher_options: dict[str, Any] = {}
        by_matcher: dict[str, dict[str, Any]] = {}
        for key, value in table.items():
            if key in matcher_keys and key not in _TRIGGER_KEYS and key not in sink_keys:
                by_matcher.setdefault(matcher_keys[key][0], {})[key] = value
        for mname, mraw in by_matcher.items():
            cls = options_class(plugins.get("matcher", mname))
            assert cls is not None
            try:
                matcher_options[mname] = structure(cls, mraw, p, "a trigger")
            except ConfigError as exc:
                # A matcher compiles its keys in a validator (e.g. an expression):
                # the user needs to know which trigger's key it is.
                raise ConfigError(f"{exc.message} (trigger {name!r})", exc.path) from None
        out.append(Trigger(
            name=name, url=url, source=source, databases=dbs, tables=tables,
            operations=operations, retries=retries, timeout=timeout, concurrency=concurrency,
            backoff_base=backoff_base, backoff_max=backoff_max, backoff_factor=backoff_factor,
            pause_after=pause_after, probe_max=probe_max, sink=sink_name,
            sink_options=sink_options, matcher_options=matcher_options,
        ))
    return tuple(out)


def resolve_store_url(url: str, config_dir: Path) -> str:
    """sqlite:///relative.db is relative to the config file's folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix):
        rest = url[len(prefix):]
        if rest and not rest.startswith("/") and rest != ":memory:":
            return prefix + str((config_dir / rest).resolve())
    return url
