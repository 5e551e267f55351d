"""The `condition` key: the matcher contract, what a condition sees of a change,
config errors at load, and evaluation errors at run time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from dbevents import Change, ConfigError, Operation, RawJSON
from dbevents.testing import MatcherContract, isolated_plugins, parse_config
from dbevents_matcher_cel import CelCondition, CelOptions, compile_condition, variables
from dbevents_matcher_cel import plugin as cel_plugin
from structlog.testing import capture_logs


def change(doc: dict[str, Any] | None, op: Operation = Operation.UPDATE,
           old: dict[str, Any] | None = None, table: str = "orders") -> Change:
    return Change(database="app", db_type="memory", table=table, operation=op, key="0:1",
                  time=datetime.now(UTC), doc_id="1", doc=doc,
                  extra={} if old is None else {"old": old})


class TestCelContract(MatcherContract):
    @pytest.fixture
    def matcher_plugin(self) -> object:
        return cel_plugin

    @pytest.fixture
    def matcher_name(self) -> str:
        return "cel"

    @pytest.fixture
    def trigger_keys(self) -> dict[str, Any]:
        return {"condition": "doc.amount > 100 && old.status != doc.status"}

    @pytest.fixture
    def matching(self) -> Change:
        return change({"id": 1, "amount": 150, "status": "paid"}, old={"status": "draft"})

    @pytest.fixture
    def not_matching(self) -> Change:
        return change({"id": 1, "amount": 150, "status": "paid"}, old={"status": "paid"})


ROW = {"id": 7, "amount": 150, "price": 99.5, "status": "paid", "email": "ann@example.com",
       "tags": ["vip"], "note": None,
       "payload": RawJSON('{"amount": 2.5, "items": [1, 2], "big": 12345678901234567.89}')}


@pytest.mark.parametrize(("condition", "want"), [
    ("doc.amount > 100", True),
    ("doc.price > 100", False),                        # double against int
    ("doc.status in ['paid', 'shipped'] && 'vip' in doc.tags", True),
    ("doc.email.endsWith('@example.com') && doc.email.lowerAscii() == doc.email", True),
    ("doc.note == null", True),
    ("doc.payload.amount > 1 && size(doc.payload.items) == 2", True),  # a JSON column
    ("doc.payload.big > 1e16", True),
    ("op == 'update' && table == 'orders' && db == 'app'", True),
    ("old.status == 'draft' && old.status != doc.status", True),
    ("has(doc.missing)", False),
    ("has(doc.missing) && doc.missing > 1", False),
])
def test_conditions_over_a_row(condition: str, want: bool) -> None:
    options = CelOptions(condition=condition)
    assert CelCondition().matches(change(ROW, old={"status": "draft"}), options) is want


def test_a_change_without_old_or_doc_sees_empty_maps() -> None:
    m, insert = CelCondition(), change({"id": 1}, op=Operation.INSERT)
    assert variables(insert)["old"] == {}
    assert m.matches(insert, CelOptions(condition="!has(old.status)")) is True
    assert m.matches(insert, CelOptions(condition="size(old) == 0 && op == 'insert'")) is True
    truncate = change(None, op=Operation.TRUNCATE)
    assert m.matches(truncate, CelOptions(condition="op == 'truncate' && doc == {}")) is True


def test_without_a_condition_everything_matches() -> None:
    assert CelCondition().matches(change({"id": 1}), CelOptions()) is True


def test_a_row_without_json_columns_is_handed_over_uncopied() -> None:
    doc = {"id": 1, "name": "ann"}
    assert variables(change(doc))["doc"] is doc
    assert variables(change({"j": RawJSON('{"a": [1]}')}))["doc"] == {"j": {"a": [1]}}


@pytest.mark.parametrize(("condition", "words"), [
    ("doc.amount >", "column 13: Syntax error"),
    ("op > 1", "column 4: found no matching overload for '_>_' applied to '(string, int)'"),
    ("dco.amount > 1", "column 4: undeclared reference to 'dco.amount'"),
    ("doc.amount +\n 1 > ", "line 2, column 6: Syntax error"),
    ("doc.amount + 1", "must give a bool (true keeps the change), but gives int"),
    ("  ", "is empty"),
])
def test_compile_errors_name_the_column(condition: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        compile_condition(condition)
    assert words in str(info.value)


CONFIG = """
[eventing]
store = "memory://cel"
[databases.app]
type = "memory"
url = "memory://cel"
[[triggers]]
name = "all"
url = "http://unused"
sink = "memory"
[[triggers]]
name = "big-orders"
url = "http://unused"
sink = "memory"
condition = {condition!r}
"""


def test_a_bad_condition_is_a_config_error_naming_key_trigger_and_column() -> None:
    plugins = isolated_plugins(("matcher-cel", cel_plugin))
    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG.format(condition="doc.amount > 'x' && op >"), plugins)
    assert info.value.path == "triggers[1].condition"
    assert info.value.exit_code == 2
    assert "(trigger 'big-orders')" in str(info.value)
    assert "CEL error at column 25: Syntax error" in str(info.value)


def test_the_condition_is_compiled_once_at_load() -> None:
    plugins = isolated_plugins(("matcher-cel", cel_plugin))
    trigger = parse_config(CONFIG.format(condition="doc.amount > 1"), plugins).triggers[1]
    options = trigger.matcher_options["cel"]
    assert options == CelOptions(condition="doc.amount > 1")
    assert options._expr is not None  # the compiled expression travels with the trigger


def test_an_evaluation_error_drops_the_change_with_a_warning_naming_the_trigger() -> None:
    from dbevents.matching import TriggerMatcher

    plugins = isolated_plugins(("matcher-cel", cel_plugin))
    config = parse_config(CONFIG.format(condition="doc.amount > 100"), plugins)
    m = TriggerMatcher(config.triggers, {"cel": CelCondition()})
    odd = change({"id": 1, "amount": "lots"})  # a string where the others hold numbers
    missing = change({"id": 2})
    with capture_logs() as logs:
        assert [t.name for t in m.match(odd)] == ["all"]
        assert [t.name for t in m.match(missing)] == ["all"]
        assert [t.name for t in m.match(change({"id": 3, "amount": 101}))] == ["all", "big-orders"]
    [warning] = [e for e in logs if e["event"] == "matcher_error"]  # one a minute
    assert warning["trigger"] == "big-orders" and warning["matcher"] == "cel"
    assert "No matching overloads" in warning["error"]
    assert "doc.amount > 100" in warning["error"]


def test_options_equal_by_condition_alone() -> None:
    a, b = CelOptions(condition="doc.x == 1"), CelOptions(condition="doc.x == 1")
    assert a == b and hash(a) == hash(b)
    assert attrs.evolve(a, condition="doc.x == 2")._expr is not a._expr
