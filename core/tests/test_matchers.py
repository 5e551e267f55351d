"""Matcher plugins: a trigger key of their own, parsed from the TOML config,
that narrows which changes a trigger takes, in matching and through the engine."""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from dbevents import Change, Operation, hookimpl
from dbevents import config as cfg
from dbevents.engine import Engine
from dbevents.errors import ConfigError
from dbevents.matching import TriggerMatcher
from dbevents.plugins import Plugins
from dbevents.testing import DELIVERIES, database, isolated_plugins, reset
from dbevents.testing.memory import STORES
from structlog.testing import capture_logs


@attrs.frozen
class StatusOptions:
    statuses: list[str]  # the row's "status" must be one of these


class StatusMatcher:
    """Fires a trigger only for rows whose status is listed."""

    Options = StatusOptions

    def matches(self, change: Change, options: StatusOptions) -> bool:
        return (change.doc or {}).get("status") in options.statuses


class StatusPlugin:
    @hookimpl
    def register_matchers(self, register: Callable[[str, Any], None]) -> None:
        register("status", StatusMatcher)


CONFIG = """
[eventing]
store = "memory://m"
source_id = "matchers"

[databases.app]
type = "memory"
url = "memory://shop"

[[triggers]]
name = "paid"
tables = "orders"
url = "http://unused/paid"
sink = "memory"
statuses = ["paid", "refunded"]

[[triggers]]
name = "every-order"
tables = "orders"
url = "http://unused/all"
sink = "memory"
"""


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset()


@pytest.fixture
def plugins() -> Plugins:
    return isolated_plugins(("status-plugin", StatusPlugin()))


def parse(plugins: Plugins, text: str = CONFIG) -> cfg.Config:
    return cfg.parse(tomllib.loads(text), plugins, {})


def order(status: str | None, n: int = 0, op: Operation = Operation.INSERT) -> Change:
    return Change(database="app", db_type="memory", table="orders", operation=op,
                  key=f"0:{n}", time=datetime.now(UTC), doc_id=str(n),
                  doc=None if status is None else {"id": n, "status": status})


def test_the_plugin_is_registered_through_the_hook(plugins: Plugins) -> None:
    assert plugins.names("matcher") == ["status"]
    assert plugins.get("matcher", "status") is StatusMatcher


def test_its_key_parses_from_toml(plugins: Plugins) -> None:
    paid, every = parse(plugins).triggers
    assert paid.matcher_options == {"status": StatusOptions(statuses=["paid", "refunded"])}
    assert every.matcher_options == {}  # the key not set: the matcher is not asked


@pytest.mark.parametrize(("line", "path", "words"), [
    ('statuses = "paid"', "triggers[1].statuses", "expected a list, got a string 'paid'"),
    ("statuses = [1]", "triggers[1].statuses[0]", "expected a string, got an integer 1"),
    ('statuse = ["paid"]', "triggers[1].statuse", "did you mean 'statuses'"),
])
def test_a_wrong_value_is_a_config_error_naming_the_key(
        plugins: Plugins, line: str, path: str, words: str) -> None:
    text = CONFIG + line + "\n"  # lands in the last trigger, triggers[1]
    with pytest.raises(ConfigError) as info:
        parse(plugins, text)
    assert info.value.path == path
    assert words in str(info.value)
    assert info.value.exit_code == 2


def test_matching_consults_the_matcher_only_for_triggers_that_use_it(plugins: Plugins) -> None:
    c = parse(plugins)
    m = TriggerMatcher(c.triggers, {"status": StatusMatcher()})

    def names(change: Change) -> list[str]:
        return [t.name for t in m.match(change)]

    assert names(order("paid")) == ["paid", "every-order"]
    assert names(order("refunded")) == ["paid", "every-order"]
    assert names(order("pending")) == ["every-order"]
    assert names(order(None, op=Operation.DELETE)) == ["every-order"]  # no row: no status
    events = m.events([order("paid", 0), order("pending", 1)], "src")
    assert [(e.trigger, e.doc_id) for e in events] == \
        [("paid", "0"), ("every-order", "0"), ("every-order", "1")]


async def test_the_engine_delivers_only_what_the_matcher_lets_through(plugins: Plugins) -> None:
    statuses = ["pending", "paid", "pending", "refunded", "cancelled", "paid"]
    db = database("shop")
    for n, status in enumerate(statuses):
        db.commit(("orders", "insert", str(n), {"id": n, "status": status}))
    db.commit(("users", "insert", "u1", {"id": "u1", "status": "paid"}))  # no trigger's table
    engine = Engine(parse(plugins), plugins)
    task = asyncio.create_task(engine.run())
    try:
        async with asyncio.timeout(20):
            while len(DELIVERIES) < 3 + len(statuses) and not task.done():
                await asyncio.sleep(0.01)
    finally:
        engine.stop()
        await asyncio.wait_for(task, 10)
    got: dict[str, list[str]] = {}
    for trigger, _, payload in DELIVERIES:
        got.setdefault(trigger, []).append(json.loads(payload)["data"]["doc"]["status"])
    assert sorted(got["paid"]) == ["paid", "paid", "refunded"]
    assert sorted(got["every-order"]) == sorted(statuses)
    # Filtered out before the store: no event is kept for what no trigger took.
    stored = sorted((e.trigger, e.doc_id) for e in STORES["m"].events.values())
    assert stored == sorted([("paid", "1"), ("paid", "3"), ("paid", "5")]
                            + [("every-order", str(n)) for n in range(len(statuses))])


# -- what a matcher compiles at load, and what it raises at run time ------------

def _positive(inst: Any, attribute: Any, value: int) -> None:
    if value <= 0:
        raise ValueError(f"must be above 0, got {value} (column 3)")


@attrs.frozen
class MinOptions:
    min_id: int = attrs.field(validator=_positive)


class MinMatcher:
    """Takes rows whose id is at least min_id; raises on a row whose id is no number."""

    Options = MinOptions

    def matches(self, change: Change, options: MinOptions) -> bool:
        return bool((change.doc or {}).get("id", 0) >= options.min_id)


class MinPlugin:
    @hookimpl
    def register_matchers(self, register: Callable[[str, Any], None]) -> None:
        register("min", MinMatcher)


def test_a_validator_error_names_the_key_and_the_trigger() -> None:
    plugins = isolated_plugins(("min-plugin", MinPlugin()))
    with pytest.raises(ConfigError) as info:
        parse(plugins, CONFIG.replace('statuses = ["paid", "refunded"]', "min_id = 0"))
    assert info.value.path == "triggers[0].min_id"
    assert "must be above 0, got 0 (column 3) (trigger 'paid')" in str(info.value)
    assert info.value.exit_code == 2


def test_a_matcher_that_raises_drops_the_change_with_one_warning_a_minute() -> None:
    plugins = isolated_plugins(("min-plugin", MinPlugin()))
    c = parse(plugins, CONFIG.replace('statuses = ["paid", "refunded"]', "min_id = 2"))
    m = TriggerMatcher(c.triggers, {"min": MinMatcher()})

    def row(n: int, id_: Any) -> Change:
        return attrs.evolve(order("paid", n), doc={"id": id_})

    with capture_logs() as logs:
        assert [t.name for t in m.match(row(0, "x"))] == ["every-order"]  # str >= int
        assert [t.name for t in m.match(row(1, "y"))] == ["every-order"]
        assert [t.name for t in m.match(row(2, 5))] == ["paid", "every-order"]
    warnings = [e for e in logs if e["event"] == "matcher_error"]
    assert len(warnings) == 1  # the second error falls inside the minute
    assert warnings[0]["trigger"] == "paid" and warnings[0]["matcher"] == "min"
    assert warnings[0]["doc_id"] == "0" and "TypeError" in warnings[0]["error"]
    assert warnings[0]["log_level"] == "warning"
