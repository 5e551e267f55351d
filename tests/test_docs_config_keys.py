"""docs/configuration.md names every key the installed plugins accept."""

from __future__ import annotations

from pathlib import Path

import attrs
from dbevents import plugins

DOC = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()


def test_every_plugin_key_is_documented() -> None:
    loaded = plugins.load()
    missing = []
    for kind in ("source", "sink", "matcher"):
        for name in loaded.names(kind):
            options = getattr(loaded.get(kind, name), "Options", None)
            if options is None:
                continue
            for field in attrs.fields(options):
                if f"| `{field.name}` |" not in DOC:
                    missing.append(f"{kind} {name}: {field.name}")
    assert not missing, f"undocumented keys: {missing}"
    assert loaded.names("source"), "the workspace's source plugins are installed"
