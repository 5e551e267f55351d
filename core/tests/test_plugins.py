"""Plugin loading through real entry points of fake distributions on sys.path."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbevents import plugins as plugins_mod
from dbevents.errors import PluginError


def make_dist(root: Path, dist: str, entry: str, module: str, body: str) -> None:
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[dbevents]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


GOOD = """
from dbevents import hookimpl

class Thing:
    pass

@hookimpl
def register_sinks(register):
    register("{name}", Thing)
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("fakeplug_")]:
        del sys.modules[mod]


def test_loads_and_lists_distribution(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    monkeypatch.setenv("DBEVENTS_PLUGINS", "a")
    loaded = plugins_mod.load()
    [info] = loaded.all()
    assert (info.kind, info.name, info.distribution, info.version) == \
        ("sink", "pigeon", "fake-sink-a", "1.2.3")


def test_two_plugins_claiming_one_name(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-sink-b", "b", "fakeplug_b", GOOD.format(name="pigeon"))
    monkeypatch.setenv("DBEVENTS_PLUGINS", "a,b")
    with pytest.raises(PluginError) as info:
        plugins_mod.load()
    assert "fake-sink-a" in str(info.value) and "fake-sink-b" in str(info.value)
    assert "'pigeon'" in str(info.value)


def test_broken_plugin_warns_and_others_load(site: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-broken", "broken", "fakeplug_broken", "raise ImportError('no lib')\n")
    monkeypatch.setenv("DBEVENTS_PLUGINS", "a,broken")
    loaded = plugins_mod.load()
    assert loaded.names("sink") == ["pigeon"]
    [failure] = loaded.failures
    assert failure.plugin == "broken" and failure.distribution == "fake-broken"
    assert "no lib" in failure.error


def test_restriction_skips_others(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-sink-b", "b", "fakeplug_b", GOOD.format(name="raven"))
    monkeypatch.setenv("DBEVENTS_PLUGINS", "b")
    assert plugins_mod.load().names("sink") == ["raven"]
