"""docs/configuration.md names every key the core and the installed plugins
accept, and the core's documented defaults are the ones it applies."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
from dbevents import plugins
from dbevents.config import _DATABASE_KEYS, _EVENTING_KEYS, _TRIGGER_KEYS, parse
from dbevents.durations import parse_duration

DOC = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
ROW = re.compile(r"^\| `([a-z_]+)` \| ([^|]*) \|", re.MULTILINE)


def test_every_plugin_key_is_documented() -> None:
    loaded = plugins.load()
    missing = []
    for kind in ("source", "sink", "matcher", "service"):
        for name in loaded.names(kind):
            options = getattr(loaded.get(kind, name), "Options", None)
            if options is None:
                continue
            for field in attrs.fields(options):
                if f"| `{field.name}` |" not in DOC:
                    missing.append(f"{kind} {name}: {field.name}")
    assert not missing, f"undocumented keys: {missing}"
    assert loaded.names("source"), "the workspace's source plugins are installed"


def core_table(heading: str) -> dict[str, str]:
    """key -> documented default, from the first table under ``## heading`` (the
    core's own; plugin tables follow it in the same section)."""
    section = DOC.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")),
               len(lines))
    table = "\n".join(lines[start:end])
    return {key: default.strip() for key, default in ROW.findall(table)}


def literal(default: str) -> Any:
    """A documented default written as a TOML value in backticks."""
    assert default.startswith("`") and default.endswith("`"), default
    return json.loads(default.strip("`"))


def test_eventing_keys_and_defaults() -> None:
    doc = core_table("`[eventing]`")
    assert set(doc) == set(_EVENTING_KEYS)
    applied = parse({}, plugins.load()).eventing
    assert literal(doc["enabled"]) == applied.enabled
    assert literal(doc["store"]) == applied.store
    assert parse_duration(literal(doc["retention"])) == applied.retention
    assert doc["source_id"] == "generated" and applied.source_id is None


def test_database_keys() -> None:
    assert set(core_table("`[databases.NAME]`")) == set(_DATABASE_KEYS)


def test_trigger_keys_and_defaults() -> None:
    doc = core_table("`[[triggers]]`")
    assert set(doc) == set(_TRIGGER_KEYS)
    # Only the required keys: everything else takes its default.
    [trigger] = parse({"triggers": [{"name": "t", "url": "https://hooks.example.com/x"}]},
                      plugins.load()).triggers
    for key in ("source", "retries", "timeout", "concurrency", "backoff_base",
                "backoff_max", "backoff_factor", "pause_after", "probe_max", "sink"):
        assert literal(doc[key]) == getattr(trigger, key), key
    assert doc["name"] == doc["url"] == "required"
    assert doc["databases"] == "every database" and trigger.databases is None
    assert doc["tables"] == "every table" and trigger.tables is None
    assert doc["operations"] == "insert, update, delete"
    assert {str(op) for op in trigger.operations} == {"insert", "update", "delete"}
