"""Config: the fixed TOML contract, defaults, interpolation, and errors that
name the key path."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner
from dbevents import config as cfg
from dbevents.cli import build
from dbevents.errors import ConfigError
from dbevents.plugins import module_from
from dbevents.testing import isolated_plugins
from dbevents.testing.memory import MemorySink, MemorySource
from dbevents.values import DEFAULT_OPERATIONS, Operation


@attrs.frozen
class HeaderOpts:
    headers: dict[str, str] = attrs.field(factory=dict)
    batch_size: int = 1


class FakeSink(MemorySink):
    Options = HeaderOpts  # type: ignore[assignment]

    @classmethod
    def validate_target(cls, url: str, options: HeaderOpts | None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")


class FakeSource(MemorySource):
    db_type = "sql-fake"

    @attrs.frozen
    class Options:
        slot: str | None = None
        server_id: int = 1000


@pytest.fixture
def plugins():  # type: ignore[no-untyped-def]
    plug = module_from(
        "fake",
        register_sinks=lambda register: register("webhook", FakeSink),
        register_sources=lambda register: register("postgres", FakeSource),
    )
    return isolated_plugins(("fake", plug))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "dbevents.toml"
    p.write_text(text)
    return p


FULL = """
[eventing]
enabled = true
store = "sqlite:///dbevents.db"

[databases.app]
type = "postgres"
url = "postgresql://app:${APP_DB_PASSWORD}@127.0.0.1:5432/app"
slot = "my_slot"

[[triggers]]
name = "welcome-email"
source = "database"
databases = ["app"]
tables = ["users"]
operations = ["insert"]
url = "https://example.com/hooks/welcome"
retries = 3
timeout = 5000
"""


def test_the_documented_example_loads(tmp_path: Path, plugins) -> None:  # type: ignore[no-untyped-def]
    c = cfg.parse(
        cfg.read_toml(write(tmp_path, FULL)), plugins, {"APP_DB_PASSWORD": "s3cret"},
        path=tmp_path / "dbevents.toml")
    assert c.eventing.enabled and c.eventing.store == "sqlite:///dbevents.db"
    assert c.eventing.retention == 7 * 86400
    db = c.databases["app"]
    assert db.type == "postgres" and db.url == "postgresql://app:s3cret@127.0.0.1:5432/app"
    assert db.options.slot == "my_slot" and db.options.server_id == 1000
    [t] = c.triggers
    assert t.name == "welcome-email" and t.databases == {"app"} and t.tables == {"users"}
    assert t.operations == {Operation.INSERT} and t.retries == 3 and t.timeout == 5000
    assert t.sink == "webhook" and t.sink_options == HeaderOpts()


def test_defaults(plugins) -> None:  # type: ignore[no-untyped-def]
    c = cfg.parse({"triggers": [{"name": "a", "url": "http://x/y"}]}, plugins, {})
    assert c.eventing == cfg.EventingConfig()
    [t] = c.triggers
    assert t.databases is None and t.tables is None and t.operations == DEFAULT_OPERATIONS
    assert (t.retries, t.timeout, t.concurrency, t.source) == (3, 5000, 16, "database")


def test_operations_as_string_any_case(plugins) -> None:  # type: ignore[no-untyped-def]
    c = cfg.parse({"triggers": [{"name": "a", "url": "http://x", "operations": "DELETE",
                                 "tables": "users"}]}, plugins, {})
    assert c.triggers[0].operations == {Operation.DELETE}
    assert c.triggers[0].tables == {"users"}


def test_env_default_and_dollar_escape(plugins) -> None:  # type: ignore[no-untyped-def]
    c = cfg.parse({"triggers": [{"name": "a", "url": "http://${HOST:-localhost:8080}/p$$1",
                                 "headers": {"Authorization": "Bearer ${TOKEN}"}}]},
                  plugins, {"TOKEN": "abc"})
    assert c.triggers[0].url == "http://localhost:8080/p$1"
    assert c.triggers[0].sink_options.headers == {"Authorization": "Bearer abc"}


def test_relative_sqlite_path_is_relative_to_config(tmp_path: Path) -> None:
    url = cfg.resolve_store_url("sqlite:///data/x.db", tmp_path)
    assert url == f"sqlite:///{tmp_path.resolve()}/data/x.db"
    assert cfg.resolve_store_url("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"


@pytest.mark.parametrize(("raw", "path", "words"), [
    ({"triggers": [{"name": "a", "url": "http://x", "timeout": "5s"}]},
     "triggers[0].timeout", "expected an integer"),
    ({"triggers": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]},
     "triggers[1].name", "duplicate trigger name 'a'"),
    ({"triggers": [{"name": "a", "url": "http://x", "databases": ["nope"]}]},
     "triggers[0].databases[0]", "no [databases.nope] section"),
    ({"databases": {"app": {"type": "oracle", "url": "x"}}},
     "databases.app.type", "installed source plugins: memory, postgres"),
    ({"triggers": [{"name": "a", "url": "http://${NOPE}"}]},
     "triggers[0].url", "NOPE is not set"),
    ({"triggers": [{"name": "a", "url": "http://x", "retires": 3}]},
     "triggers[0].retires", "did you mean 'retries'"),
    ({"triggers": [{"name": "a", "url": "ftp://x"}]}, "triggers[0].url",
     "expected an http:// or https:// URL (trigger 'a', sink 'webhook')"),
    ({"triggers": [{"url": "http://x"}]}, "triggers[0].name", "required key 'name'"),
    ({"triggers": [{"name": "a"}]}, "triggers[0].url", "required key 'url'"),
    ({"triggers": [{"name": "a", "url": "http://x", "operations": ["upsert"]}]},
     "triggers[0].operations[0]", "unknown operation 'upsert'"),
    ({"triggers": [{"name": "a", "url": "http://x", "retries": -1}]},
     "triggers[0].retries", "0 or more"),
    ({"eventing": {"stor": "x"}}, "eventing.stor", "did you mean 'store'"),
    ({"eventing": {"retention": "forever"}}, "eventing.retention", "duration"),
    ({"databases": {"app": {"type": "postgres", "url": "x", "slott": "s"}}},
     "databases.app.slott", "did you mean 'slot'"),
    ({"databases": {"app": {"type": "postgres", "url": "x", "server_id": "1"}}},
     "databases.app.server_id", "expected an integer"),
    ({"triggers": [{"name": "a", "url": "http://x", "headers": {"A": 1}}]},
     "triggers[0].headers.A", "expected a string"),
    ({"trigger": []}, "trigger", "did you mean 'triggers'"),
    ({"triggers": [{"name": "a", "url": "http://x", "source": "queue"}]},
     "triggers[0].source", "unknown event source 'queue'; the only one is 'database'"),
    ({"triggers": [{"name": "a", "url": "http://x", "source": 1}]},
     "triggers[0].source", "expected a string"),
])
def test_bad_input_names_the_key(raw, path, words, plugins) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        cfg.parse(raw, plugins, {})
    assert info.value.path == path
    assert words in str(info.value)
    assert info.value.exit_code == 2


def test_missing_file_and_syntax_error(tmp_path: Path, plugins) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="config file not found"):
        cfg.load(tmp_path / "none.toml", plugins)
    p = write(tmp_path, "[eventing]\nstore = \n")
    with pytest.raises(ConfigError, match=r"line 2, column 9") as info:
        cfg.load(p, plugins)
    assert str(p) in str(info.value)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBEVENTS_CONFIG", raising=False)
    assert cfg.config_path(None) == Path("dbevents.toml")
    monkeypatch.setenv("DBEVENTS_CONFIG", "/etc/x.toml")
    assert cfg.config_path(None) == Path("/etc/x.toml")
    assert cfg.config_path("given.toml") == Path("given.toml")


def test_check_rejects_a_trigger_source_other_than_database(tmp_path: Path) -> None:
    p = write(tmp_path, '[[triggers]]\nname = "a"\nurl = "http://x"\nsink = "memory"\n'
                        'source = "queue"\n')
    plugins = isolated_plugins()
    r = CliRunner().invoke(build(plugins), ["--config", str(p), "check"], obj=plugins)
    assert r.exit_code == 2
    assert "triggers[0].source" in r.output and "unknown event source 'queue'" in r.output
    assert "ok" not in r.output.splitlines()


class NoTruncateSource(MemorySource):
    db_type = "doc-fake"
    operations = frozenset({Operation.INSERT, Operation.UPDATE, Operation.DELETE})


def _two_kinds() -> cfg.Plugins:
    plug = module_from(
        "two",
        register_sinks=lambda register: register("webhook", FakeSink),
        register_sources=lambda register: (register("postgres", FakeSource),
                                           register("docs", NoTruncateSource)),
    )
    return isolated_plugins(("two", plug))


TWO_DATABASES = {"databases": {"sql": {"type": "postgres", "url": "x"},
                               "doc": {"type": "docs", "url": "y"}}}


def test_truncate_is_refused_where_no_database_can_emit_it() -> None:
    plugins = _two_kinds()

    def parse(trigger: dict[str, object]) -> cfg.Config:
        return cfg.parse({**TWO_DATABASES, "triggers": [{"name": "t", "url": "http://x",
                                                         **trigger}]}, plugins)

    # Named explicitly: the database that cannot is named, with its type.
    with pytest.raises(ConfigError) as info:
        parse({"databases": ["doc"], "operations": ["insert", "truncate"]})
    assert info.value.path == "triggers[0].operations"
    assert "'doc' (type 'docs') never emits truncate events" in str(info.value)
    with pytest.raises(ConfigError, match="'doc'"):
        parse({"databases": ["sql", "doc"], "operations": "truncate"})
    # Every database: fine while one of them can, and then it fires there only.
    [trigger] = parse({"operations": ["truncate"]}).triggers
    assert trigger.operations == frozenset({Operation.TRUNCATE})
    assert [t.operations for t in parse({"databases": "sql", "operations": "truncate"}
                                        ).triggers] == [frozenset({Operation.TRUNCATE})]
    # The other operations are emitted by both.
    parse({"databases": ["doc"], "operations": ["insert", "update", "delete"]})


def test_truncate_is_refused_when_no_database_of_any_kind_can() -> None:
    plugins = _two_kinds()
    raw = {"databases": {"doc": {"type": "docs", "url": "y"}},
           "triggers": [{"name": "t", "url": "http://x", "operations": ["truncate"]}]}
    with pytest.raises(ConfigError) as info:
        cfg.parse(raw, plugins)
    assert info.value.path == "triggers[0].operations"
    assert "none of the databases (types docs) emits truncate events" in str(info.value)


@attrs.frozen
class LimitOpts:
    maxlen: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    mode: str = attrs.field(default="a", validator=attrs.validators.in_(["a", "b"]))


class LimitSink(MemorySink):
    Options = LimitOpts  # type: ignore[assignment]


def _limit_plugins() -> cfg.Plugins:
    plug = module_from("lim", register_sinks=lambda register: register("lim", LimitSink))
    return isolated_plugins(("lim", plug))


@pytest.mark.parametrize(("key", "value", "words"), [
    ("maxlen", 0, "'maxlen' must be >= 1: 0"),
    ("mode", "c", "'mode' must be in ['a', 'b'] (got 'c')"),
])
def test_an_attrs_validator_error_names_its_key(key: str, value: object, words: str) -> None:
    raw = {"triggers": [{"name": "a", "url": "x://y", "sink": "lim", key: value}]}
    with pytest.raises(ConfigError) as info:
        cfg.parse(raw, _limit_plugins(), environ={})
    assert info.value.path == f"triggers[0].{key}"
    assert info.value.message == words


class CheckedSink(MemorySink):
    """A sink whose targets are redis:// URLs with a database number."""

    @classmethod
    def validate_target(cls, url: str, options: object) -> None:
        if not url.startswith("redis://") or not url.rsplit("/", 1)[-1].isdigit():
            raise ValueError("expected redis://HOST/DB with a database number")


def test_a_sink_validates_its_own_target_when_the_config_loads() -> None:
    plug = module_from("chk", register_sinks=lambda register: register("redis", CheckedSink))
    plugins = isolated_plugins(("chk", plug))
    good = {"triggers": [{"name": "a", "url": "redis://cache/2", "sink": "redis"}]}
    assert cfg.parse(good, plugins, environ={}).triggers[0].url == "redis://cache/2"
    bad = {"triggers": [good["triggers"][0], {"name": "b", "url": "redis://cache",
                                              "sink": "redis"}]}
    with pytest.raises(ConfigError) as info:
        cfg.parse(bad, plugins, environ={})
    assert info.value.path == "triggers[1].url"
    assert "expected redis://HOST/DB with a database number (trigger 'b', sink 'redis')" \
        in str(info.value)
    # The core itself has no opinion on a sink's URLs: a memory sink takes any.
    anything = {"triggers": [{"name": "a", "url": "ftp://x", "sink": "memory"}]}
    assert cfg.parse(anything, plugins, environ={}).triggers[0].url == "ftp://x"


def test_check_exits_2_naming_the_key_of_a_bad_target(tmp_path: Path) -> None:
    plug = module_from("chk", register_sinks=lambda register: register("redis", CheckedSink))
    path = write(tmp_path, '[[triggers]]\nname = "a"\nsink = "redis"\nurl = "redis://c"\n')
    r = CliRunner().invoke(build(isolated_plugins(("chk", plug))),
                           ["--config", str(path), "check"], obj=isolated_plugins(("chk", plug)))
    assert r.exit_code == 2
    assert "triggers[0].url" in r.output and "database number" in r.output


@pytest.mark.parametrize(("written", "suggested"), [
    ("postgresql", "postgres"), ("pg", "postgres"), ("PostgreSQL", "postgres"),
    ("postgress", "postgres"), ("memroy", "memory"),
])
def test_unknown_database_type_suggests_the_installed_one(
        written: str, suggested: str, plugins) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as err:
        cfg.parse({"databases": {"app": {"type": written, "url": "x"}}}, plugins)
    assert err.value.path == "databases.app.type"
    assert f"unknown database type {written!r} (did you mean {suggested!r}?)" in str(err.value)


def test_an_alias_of_a_source_not_installed_suggests_nothing(plugins) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as err:
        cfg.parse({"databases": {"app": {"type": "mariadb", "url": "x"}}}, plugins)
    assert "did you mean" not in str(err.value)
    assert "installed source plugins: memory, postgres" in str(err.value)
