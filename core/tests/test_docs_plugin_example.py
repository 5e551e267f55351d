"""The worked plugin example in docs/plugins.md runs as written: its sink passes
the sink contract suite, and it loads through the plugin machinery."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from dbevents import Trigger
from dbevents.testing import SinkContract, isolated_plugins

DOC = Path(__file__).parents[2] / "docs" / "plugins.md"


def _plugin_module() -> types.ModuleType:
    text = DOC.read_text()
    code = re.search(r"`plugin.py`:\n\n```python\n(.*?)```", text, re.S)
    assert code, "docs/plugins.md lost its plugin.py example"
    module = types.ModuleType("dbevents_sink_jsonl_example")
    exec(compile(code.group(1), str(DOC), "exec"), module.__dict__)
    return module


example = _plugin_module()


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
