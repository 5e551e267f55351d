"""The keys a `[databases.NAME]` table of type "mysql" adds, and the URL."""

from __future__ import annotations

import re
import zlib
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
from dbevents import ConfigError

# Replica server ids this source picks by itself live in [2**31, 2**32 - 1):
# far above the small numbers people give real servers and replicas.
SERVER_ID_BASE = 2**31
SERVER_ID_SPAN = 2**31 - 1
_START = re.compile(r"^(end|earliest|[^:\s]+:\d+)$")
_URL_PARAMS = ("unix_socket", "ssl_ca", "ssl_cert", "ssl_key")


def _check_server_id(_: Any, __: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 1 <= value <= 2**32 - 1:
        raise ValueError(f"server_id must be from 1 to 4294967295, got {value}")


def _check_start(_: Any, __: attrs.Attribute[Any], value: str) -> None:
    if not _START.match(value):
        raise ValueError(
            f"start must be \"end\", \"earliest\" or \"FILE:POSITION\" "
            f"(e.g. \"mysql-bin.000042:4\"), got {value!r}"
        )


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value}")


@attrs.frozen
class MysqlOptions:
    """Extra keys of a ``[databases.NAME]`` table with ``type = "mysql"``."""

    # Databases (schemas) to watch; default: the database named in the URL.
    schemas: list[str] = attrs.field(factory=list)
    # This reader's replica id; default: derived from NAME and the URL's database
    # (see default_server_id). Two readers with one id disconnect each other.
    server_id: int | None = attrs.field(default=None, validator=_check_server_id)
    # Where a source with no checkpoint yet begins: "end" (the binlog's current
    # end), "earliest" (the oldest binlog file still on the server) or "FILE:POS".
    start: str = attrs.field(default="end", validator=_check_start)
    # At most this many changes in one batch handed to the engine.
    batch_size: int = attrs.field(default=1000, validator=_positive)
    # Seconds between heartbeats the server sends on a quiet binlog; a connection
    # silent for 3 heartbeats is taken for dead and reopened.
    heartbeat: float = attrs.field(default=5.0, validator=_positive)
    # Seconds to keep reconnecting after the server went away before giving up
    # (the engine then restarts the source from the checkpoint after a pause).
    reconnect_timeout: float = attrs.field(default=300.0, validator=_positive)
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)


@attrs.frozen
class ConnectParams:
    """How to reach the server, from a ``mysql://user:password@host:port/db`` URL."""

    host: str
    port: int
    user: str
    password: str = attrs.field(repr=False)
    database: str | None
    extra: dict[str, str] = attrs.field(factory=dict)

    def pymysql_kwargs(self, connect_timeout: float, **more: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "host": self.host, "port": self.port, "user": self.user,
            "password": self.password, "charset": "utf8mb4", "autocommit": True,
            "connect_timeout": connect_timeout, **self.extra,
        }
        kwargs.update(more)
        return kwargs


def parse_url(url: str, key: str = "url") -> ConnectParams:
    """``mysql://`` or ``mariadb://`` URL -> ConnectParams; ConfigError when malformed.

    Query parameters ``unix_socket``, ``ssl_ca``, ``ssl_cert`` and ``ssl_key`` are
    passed to PyMySQL as they are.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or 3306
    except ValueError as exc:
        raise ConfigError(f"not a valid URL: {exc}", path=key) from None
    if parts.scheme not in ("mysql", "mariadb"):
        raise ConfigError(
            f"the URL must start with mysql:// or mariadb://, got {parts.scheme or '?'}://",
            path=key)
    extra: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _URL_PARAMS:
            raise ConfigError(
                f"unknown URL parameter {name!r}; known: {', '.join(_URL_PARAMS)}", path=key)
        extra[name] = value
    if not parts.hostname and "unix_socket" not in extra:
        raise ConfigError("the URL names no host", path=key)
    database = unquote(parts.path.lstrip("/")) or None
    return ConnectParams(
        host=parts.hostname or "localhost", port=port,
        user=unquote(parts.username or ""), password=unquote(parts.password or ""),
        database=database, extra=extra,
    )


def watched_schemas(options: MysqlOptions, params: ConnectParams) -> tuple[str, ...]:
    if options.schemas:
        return tuple(dict.fromkeys(options.schemas))
    if params.database:
        return (params.database,)
    raise ConfigError(
        "name the database to watch in the URL (mysql://user@host/DBNAME) or list "
        "them in `schemas`", path="schemas")


def default_server_id(name: str, schemas: tuple[str, ...]) -> int:
    """A stable id in the high range, from the section name and the databases, so a
    restarted process takes over its own stale replica connection while two
    differently named sources do not collide."""
    digest = zlib.crc32(f"dbevents\0{name}\0{','.join(schemas)}".encode())
    return SERVER_ID_BASE + digest % SERVER_ID_SPAN
