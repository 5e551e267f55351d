"""The store URL: libpq's own URL plus a few parameters of ours, stripped before
connecting (libpq refuses parameters it does not know).

    postgresql://dbevents:${PW}@db.internal:5432/app?schema=events&pool_max_size=16

Everything else in the URL (sslmode, connect_timeout, application_name, ...)
goes to libpq unchanged.
"""

from __future__ import annotations

import os
import zlib
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
from dbevents.errors import ConfigError
from dbevents.masking import mask_dsn
from psycopg.conninfo import conninfo_to_dict, make_conninfo

SCHEMES = ("postgresql", "postgres")
DEFAULT_SCHEMA = "dbevents"

# Our parameters and their defaults; documented in the package README.
DEFAULTS: dict[str, str] = {
    "schema": DEFAULT_SCHEMA,
    "pool_min_size": "1",
    "pool_max_size": "8",
    "pool_timeout": "10",
}
# libpq waits for ever on an unanswered SYN unless told otherwise.
DEFAULT_CONNECT_TIMEOUT = "10"
MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names (NAMEDATALEN - 1 bytes)
N = TypeVar("N", int, float)


@attrs.frozen
class Location:
    """Where the store lives and how to reach it."""

    # For libpq, our parameters removed. It holds the password: kept out of repr.
    conninfo: str = attrs.field(repr=False)
    display: str  # the URL with the password masked: the only form ever shown
    where: str  # "host:port" (or socket folder), for error messages
    user: str
    dbname: str
    schema: str
    pool_min_size: int
    pool_max_size: int
    pool_timeout: float

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel: one per schema, as stores in one database
        but different schemas must not wake each other."""
        name = f"dbevents.{self.schema}".encode()
        if len(name) <= MAX_IDENTIFIER:
            return name.decode()
        # Too long for a channel name: a stable short form instead.
        return f"dbevents.{zlib.crc32(name):08x}"

    def lock_key(self, purpose: str) -> tuple[int, int]:
        """A two-part advisory lock key: "dbev" and a hash of schema and purpose,
        so that stores in different schemas of one database do not wait for each
        other (a hash collision would only make them wait, never break them)."""
        digest = zlib.crc32(f"{self.schema}\0{purpose}".encode())
        return 0x64626576, digest - (1 << 32) if digest >= 1 << 31 else digest


def parse_url(url: str) -> Location:
    """The Location in ``url``; ConfigError (exit 2) names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ConfigError(f"expected a URL such as 'postgresql://user:password@host:5432/db', "
                          f"got {mask_dsn(url)!r}", path="eventing.store")
    ours = dict(DEFAULTS)
    libpq: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ours:
            ours[key] = value
        else:
            libpq.append((key, value))
    query = urlencode(libpq)
    stripped = urlunsplit(("postgresql", parts.netloc, parts.path, query, parts.fragment))
    try:
        params = conninfo_to_dict(stripped)
    except Exception as exc:  # libpq's parser: unknown parameter, bad port...
        raise ConfigError(f"{_first_line(exc)} in {mask_dsn(url)}",
                          path="eventing.store") from None
    for port in str(params.get("port") or "").split(","):
        if port and not port.isdigit():
            raise ConfigError(f"the port must be a number, got {port!r} in {mask_dsn(url)}",
                              path="eventing.store")
    params.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    params.setdefault("application_name", "dbevents")
    schema = ours["schema"]
    if not schema or len(schema.encode()) > MAX_IDENTIFIER or "\0" in schema:
        raise ConfigError(f"schema must be a name of 1 to {MAX_IDENTIFIER} bytes, got "
                          f"{schema!r}", path="eventing.store")
    min_size = _number(ours, "pool_min_size", int, 0)
    max_size = _number(ours, "pool_max_size", int, 1)
    if min_size > max_size:
        raise ConfigError(f"pool_min_size ({min_size}) exceeds pool_max_size ({max_size})",
                          path="eventing.store")
    return Location(
        conninfo=make_conninfo(**params),
        display=mask_dsn(url),
        where=_where(params),
        user=str(params.get("user") or os.environ.get("PGUSER") or _login()),
        dbname=str(params.get("dbname") or os.environ.get("PGDATABASE") or ""),
        schema=schema,
        pool_min_size=min_size,
        pool_max_size=max_size,
        pool_timeout=_number(ours, "pool_timeout", float, 0.1),
    )


def _number(options: dict[str, str], key: str, kind: type[N], least: N) -> N:
    try:
        value = kind(options[key])
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {options[key]!r}",
                          path="eventing.store") from None
    if value < least:
        raise ConfigError(f"{key} must be at least {least}, got {value}", path="eventing.store")
    return value


def _where(params: dict[str, object]) -> str:
    hosts = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST")
                or "localhost (default socket)").split(",")
    ports = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    if len(ports) < len(hosts):
        ports += [ports[-1]] * (len(hosts) - len(ports))
    return ", ".join(f"{h}:{p or '5432'}" for h, p in zip(hosts, ports, strict=False))


def _login() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return "(the login name)"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
