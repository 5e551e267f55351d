"""The worked plugin examples in docs/plugins.md run as written: the sink passes
the sink contract suite, the matcher the matcher contract suite, and both load
through the plugin machinery."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from dbevents import Change, Trigger
from dbevents.testing import MatcherContract, SinkContract, isolated_plugins

DOC = Path(__file__).parents[2] / "docs" / "plugins.md"


def _module(filename: str, name: str) -> types.ModuleType:
    text = DOC.read_text()
    code = re.search(rf"`{re.escape(filename)}`:\n\n```python\n(.*?)```", text, re.S)
    assert code, f"docs/plugins.md lost its {filename} example"
    module = types.ModuleType(name)
    exec(compile(code.group(1), str(DOC), "exec"), module.__dict__)
    return module


def _block_after(heading: str) -> str:
    """The first python block after ``heading`` in docs/plugins.md."""
    text = DOC.read_text()
    code = re.search(re.escape(heading) + r".*?```python\n(.*?)```", text, re.S)
    assert code, f"docs/plugins.md lost the example under {heading!r}"
    return code.group(1)


example = _module("plugin.py", "dbevents_sink_jsonl_example")
matcher_example = _module("matcher.py", "dbevents_match_changed_example")


def test_example_registers_through_pluggy() -> None:
    plugins = isolated_plugins(("sink-jsonl", example), memory=False)
    assert plugins.get("sink", "jsonl") is example.JsonlSink


class TestJsonlSinkFromDocs(SinkContract):
    @pytest.fixture
    async def sink(self):  # type: ignore[no-untyped-def]
        s = example.JsonlSink()
        await s.open()
        yield s
        await s.close()

    @pytest.fixture
    def ok_trigger(self, tmp_path: Path) -> Trigger:
        return Trigger(name="t", url=f"file://{tmp_path}/out.jsonl", sink="jsonl")

    @pytest.fixture
    def failing_trigger(self, tmp_path: Path) -> Trigger:
        return Trigger(name="t", url=f"file://{tmp_path}/missing/dir/out.jsonl", sink="jsonl")

    async def test_lines_are_the_payloads(self, sink, ok_trigger: Trigger) -> None:  # type: ignore[no-untyped-def]
        from dbevents.testing import make_event

        evs = [make_event(doc_id=str(i)) for i in range(3)]
        await sink.deliver(ok_trigger, evs)
        out = Path(ok_trigger.url.removeprefix("file://"))
        lines = out.read_bytes().splitlines()  # noqa: ASYNC240
        assert lines == [e.payload for e in evs]


def test_matcher_example_registers_through_pluggy() -> None:
    plugins = isolated_plugins(("match-changed", matcher_example), memory=False)
    assert plugins.get("matcher", "changed") is matcher_example.ChangedColumns


def _matcher_suite() -> type:
    """The docs' MatcherContract subclass, run with its import of the plugin
    module pointed at the example above."""
    code = _block_after("### MatcherContract")
    code = code.replace("import dbevents_match_changed.matcher as matcher_module\n", "")
    namespace: dict[str, object] = {"matcher_module": matcher_example}
    exec(compile(code, str(DOC), "exec"), namespace)
    suite = namespace["TestChangedColumns"]
    assert isinstance(suite, type) and issubclass(suite, MatcherContract)
    return suite


TestChangedColumnsFromDocs = _matcher_suite()


def test_the_example_keeps_updates_it_cannot_judge() -> None:
    from datetime import UTC, datetime

    from dbevents import Operation

    m = matcher_example.ChangedColumns()
    opts = matcher_example.ChangedOptions(changed=["email"])
    no_old = Change(database="app", db_type="sql-postgres", table="users",
                    operation=Operation.UPDATE, key="k", time=datetime.now(UTC),
                    doc_id="1", doc={"id": 1, "email": "a@x"})
    assert m.matches(no_old, opts) is True


def _in_process_test() -> object:
    code = _block_after("### Your plugin in-process")
    code = code.replace("import dbevents_match_changed.matcher as matcher_module\n", "")
    namespace: dict[str, object] = {"matcher_module": matcher_example}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["test_only_email_changes_are_delivered"]


test_docs_in_process_engine_run = _in_process_test()
