"""The store URL: both schemes select the store, our parameters are taken out,
libpq's passed on, secrets kept out of everything that may be shown."""

from __future__ import annotations

import dbevents_store_postgres.plugin as store_plugin
import pytest
from dbevents.errors import ConfigError
from dbevents.testing import isolated_plugins
from dbevents_store_postgres import PostgresStore
from dbevents_store_postgres.url import parse_url
from psycopg.conninfo import conninfo_to_dict


def test_both_schemes_select_the_store() -> None:
    plugins = isolated_plugins(("store-postgres", store_plugin), memory=False)
    assert plugins.get("store", "postgresql") is PostgresStore
    assert plugins.get("store", "postgres") is PostgresStore


def test_our_parameters_are_taken_out_and_libpqs_passed_on() -> None:
    loc = parse_url("postgres://app:pw@db.internal:6543/events?schema=ev&pool_max_size=3"
                    "&sslmode=require&application_name=mine")
    params = conninfo_to_dict(loc.conninfo)
    assert params == {"user": "app", "password": "pw", "host": "db.internal", "port": "6543",
                      "dbname": "events", "sslmode": "require", "application_name": "mine",
                      "connect_timeout": "10"}
    assert (loc.schema, loc.pool_min_size, loc.pool_max_size, loc.pool_timeout) == \
        ("ev", 1, 3, 10.0)
    assert (loc.where, loc.user, loc.dbname) == ("db.internal:6543", "app", "events")


def test_the_password_is_never_shown() -> None:
    loc = parse_url("postgresql://app:s3cret@db/events?password=other-s3cret")
    assert "s3cret" not in loc.display and "s3cret" not in repr(loc)
    assert loc.display == "postgresql://app:***@db/events?password=***"
    assert "password=s3cret" in loc.conninfo or "password=other-s3cret" in loc.conninfo


def test_several_hosts_are_all_named() -> None:
    loc = parse_url("postgresql://app@h1:5433,h2/events")
    assert loc.where == "h1:5433, h2:5432"


def test_channel_and_lock_keys_depend_on_the_schema() -> None:
    one, other = parse_url("postgresql://h/db"), parse_url("postgresql://h/db?schema=x")
    assert one.channel == "dbevents.dbevents" and other.channel == "dbevents.x"
    assert one.lock_key("queue") != other.lock_key("queue") != other.lock_key("migrate")
    assert all(-(2 ** 31) <= k < 2 ** 31 for k in one.lock_key("queue"))
    long = parse_url("postgresql://h/db?schema=" + "s" * 63)
    assert len(long.channel.encode()) <= 63


@pytest.mark.parametrize("url", ["mysql://h/db", "postgresql://h/db?schema=",
                                 "postgresql://h/db?pool_timeout=soon",
                                 "postgresql://h:notaport/db"])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_url(url)
    assert info.value.path == "eventing.store"
