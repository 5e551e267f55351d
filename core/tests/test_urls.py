"""Raw passwords in connection URLs: one reading for every driver, or a clear error."""

from __future__ import annotations

import pytest
from dbevents import config as cfg
from dbevents.errors import ConfigError
from dbevents.plugins import module_from
from dbevents.testing import isolated_plugins
from dbevents.testing.memory import MemorySink, MemorySource
from dbevents.urls import normalize_userinfo


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://app:p@ss@db:5432/app", "postgresql://app:p%40ss@db:5432/app"),
    ("mysql://app:a@b:c@@db/app?ssl_ca=/x", "mysql://app:a%40b:c%40@db/app?ssl_ca=/x"),
    ("mongodb://u:p@w@h1:1,h2:2/db", "mongodb://u:p%40w@h1:1,h2:2/db"),
    # Nothing to do: already encoded, no password, an "@" only in the query.
    ("postgresql://app:p%40ss@db/app", "postgresql://app:p%40ss@db/app"),
    ("postgresql://db:5432/app?sslrootcert=/certs/a@b.pem",
     "postgresql://db:5432/app?sslrootcert=/certs/a@b.pem"),
    ("postgresql://[::1]:5432/app?x=a@b", "postgresql://[::1]:5432/app?x=a@b"),
    ("sqlite:///var/lib/dbevents@1/events.db", "sqlite:///var/lib/dbevents@1/events.db"),
    ("host=db password=p@ss", "host=db password=p@ss"),
])
def test_at_signs_in_the_user_part_are_encoded(url: str, expected: str) -> None:
    assert normalize_userinfo(url, "databases.app.url") == expected


@pytest.mark.parametrize("url", [
    "mysql://app:pa/ss@db/app",
    "postgresql://app:pa?ss@db:5432/app",
    "postgresql://app:pa#ss@db/app",
    "postgresql://app:Xy7q@Zsec:ret9/pw%40Q99@127.0.0.1:5432/app",
])
def test_a_password_cut_by_slash_query_or_fragment_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        normalize_userinfo(url, "databases.app.url")
    message = str(info.value)
    assert message.startswith("databases.app.url: ") and "%2F" in message
    for piece in ("pa", "ss", "Xy7q", "Zsec", "ret9", "Q99"):
        assert piece not in message.split(": ", 1)[1].replace("password", "")


def test_the_config_reads_database_and_store_urls_this_way() -> None:
    raw = {"eventing": {"store": "postgresql://ev:s@cret@127.0.0.1/ev"},
           "databases": {"app": {"type": "memory", "url": "memory://u:a@b@host/x"}},
           "triggers": [{"name": "t", "url": "http://127.0.0.1:1/x"}]}
    plug = module_from("m", register_sinks=lambda register: register("webhook", MemorySink),
                       register_sources=lambda register: register("memory", MemorySource))
    c = cfg.parse(raw, isolated_plugins(("m", plug)), {})
    assert c.eventing.store == "postgresql://ev:s%40cret@127.0.0.1/ev"
    assert c.databases["app"].url == "memory://u:a%40b@host/x"
    raw["databases"]["app"]["url"] = "memory://u:a/b@host/x"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"^databases\.app\.url: "):
        cfg.parse(raw, isolated_plugins(("m", plug)), {})
