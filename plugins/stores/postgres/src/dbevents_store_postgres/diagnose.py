"""Turning what goes wrong at open() into a SetupError that says what to fix.

libpq reports connection failures as text only (no SQLSTATE), so the
recognisable phrases of its messages are matched; anything else is passed on
as it came, after the store's masked URL.
"""

from __future__ import annotations

import re

import psycopg
from dbevents.errors import SetupError

from dbevents_store_postgres.url import Location


def short(exc: BaseException) -> str:
    """The first line of an error, without libpq's "connection failed:" prefix."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.removeprefix("connection failed: ").strip()


def connect_error(exc: psycopg.Error, loc: Location) -> SetupError:
    text = str(exc)
    low = text.lower()
    reason = _reason(text)
    store = f"the eventing DB {loc.display}"
    if "password authentication failed" in low or "password must be" in low \
            or "no password supplied" in low or "fe_sendauth" in low:
        return SetupError(
            f"PostgreSQL at {loc.where} refused the login of user {loc.user!r} for {store}: "
            f"authentication failed ({reason}); fix the user name or password in "
            "[eventing] store")
    if re.search(r'role ".*" does not exist', text):
        return SetupError(
            f"PostgreSQL at {loc.where} has no role {loc.user!r} ({store}): authentication "
            f"failed ({reason}); fix the user name in [eventing] store or create the role: "
            f"CREATE ROLE \"{loc.user}\" LOGIN PASSWORD '...'")
    if "pg_hba.conf" in low:
        return SetupError(
            f"PostgreSQL at {loc.where} does not let user {loc.user!r} connect to database "
            f"{loc.dbname!r} from this host ({reason}); add a line for it to pg_hba.conf "
            f"({store})")
    if re.search(r'database ".*" does not exist', text):
        return SetupError(
            f"PostgreSQL at {loc.where} has no database {loc.dbname!r} ({store}); create it "
            f"(CREATE DATABASE \"{loc.dbname}\") or fix the database name in [eventing] store")
    if "too many connections" in low or "connection slots" in low:
        return SetupError(
            f"PostgreSQL at {loc.where} accepts no more connections ({reason}); raise its "
            "max_connections or lower pool_max_size in [eventing] store "
            f"({store})")
    if "starting up" in low or "shutting down" in low or "recovery mode" in low \
            or "not yet accepting" in low:
        return SetupError(f"PostgreSQL at {loc.where} is not accepting connections yet "
                          f"({reason}); try again once it is up ({store})")
    if any(p in low for p in ("connection refused", "could not connect", "timeout expired",
                              "failed to resolve", "could not translate host name",
                              "no such file or directory", "network is unreachable",
                              "no route to host", "connection timed out", "host is down")):
        return SetupError(
            f"cannot reach PostgreSQL at {loc.where} for {store}: {reason}; check that the "
            "server runs and accepts connections there, and the host and port in "
            "[eventing] store")
    return SetupError(f"cannot connect to {store} at {loc.where}: {reason}")


def _reason(text: str) -> str:
    """libpq's message, on one line, without the host and port it repeats."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = (lines or ["unknown error"])[0].removeprefix("connection failed: ")
    if "failed: " in first:
        first = first.split("failed: ", 1)[1]
    return first.removeprefix("FATAL:").strip()


def read_only(loc: Location, in_recovery: bool) -> SetupError:
    if in_recovery:
        return SetupError(
            f"the eventing DB {loc.display} at {loc.where} is a read-only standby (it is in "
            "recovery); point [eventing] store at the primary server")
    return SetupError(
        f"the eventing DB {loc.display} at {loc.where} is read-only for user {loc.user!r} "
        "(default_transaction_read_only is on for this database, role or server); "
        "dbevents writes to it even to show the log: turn it off for this role "
        f"(ALTER ROLE \"{loc.user}\" SET default_transaction_read_only = off) or use "
        "another database")


def cannot_create_schema(loc: Location, exc: psycopg.Error) -> SetupError:
    return SetupError(
        f"user {loc.user!r} may not create the schema {loc.schema!r} in database "
        f"{loc.dbname!r} ({short(exc)}); either let it: GRANT CREATE ON DATABASE "
        f"\"{loc.dbname}\" TO \"{loc.user}\"; or create the schema for it: CREATE SCHEMA "
        f"\"{loc.schema}\" AUTHORIZATION \"{loc.user}\" (eventing DB {loc.display})")


def missing_grants(loc: Location, grants: list[str]) -> SetupError:
    return SetupError(
        f"user {loc.user!r} lacks privileges on the eventing DB schema {loc.schema!r} "
        f"({loc.display}); as its owner, run: " + "; ".join(grants))


def cannot_migrate(loc: Location, exc: psycopg.Error) -> SetupError:
    return SetupError(
        f"user {loc.user!r} may not create or change the tables of the schema "
        f"{loc.schema!r} ({short(exc)}); start dbevents once as the schema's owner so that "
        f"it creates or migrates them, or make {loc.user!r} the owner: ALTER SCHEMA "
        f"\"{loc.schema}\" OWNER TO \"{loc.user}\" (eventing DB {loc.display})")
