"""Plugin loading through real entry points of fake distributions on sys.path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbevents import plugins as plugins_mod
from dbevents.errors import PluginError
from structlog.testing import capture_logs


def make_dist(root: Path, dist: str, entry: str, module: str, body: str) -> None:
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[dbevents]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


GOOD = """
from dbevents import hookimpl

class Thing:
    async def open(self): ...
    async def close(self): ...
    def batch_size(self, trigger): return 1
    async def deliver(self, trigger, events): return []

@hookimpl
def register_sinks(register):
    register("{name}", Thing)
"""

# A sink with a `batch_size` key and a matcher with one: the same trigger key.
KEYED = """
import attrs
from dbevents import hookimpl

@attrs.frozen
class Opts:
    {key}: int = 1

class Sink:
    Options = Opts
    async def open(self): ...
    async def close(self): ...
    def batch_size(self, trigger): return 1
    async def deliver(self, trigger, events): return []

class Matcher:
    Options = Opts
    def matches(self, change, options): return True

@hookimpl
def register_{kind}s(register):
    register("{name}", {cls})
"""


def run_cli(site: Path, wanted: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The launcher in its own process, with the fake distributions on its path."""
    env = {**os.environ, "PYTHONPATH": str(site), "DBEVENTS_PLUGINS": wanted}
    return subprocess.run([sys.executable, "-m", "dbevents.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


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
    loaded = plugins_mod.load()
    with pytest.raises(PluginError) as info:
        loaded.check()
    assert "fake-sink-a" in str(info.value) and "fake-sink-b" in str(info.value)
    assert "'pigeon'" in str(info.value)


def test_one_entry_point_name_from_two_distributions(site: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Both declare the entry point "a"; neither may silently shadow the other.
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-sink-b", "a", "fakeplug_b", GOOD.format(name="raven"))
    monkeypatch.setenv("DBEVENTS_PLUGINS", "a")
    with pytest.raises(PluginError) as info:
        plugins_mod.load().check()
    message = str(info.value)
    assert "fake-sink-a" in message and "fake-sink-b" in message
    assert "plugin 'a'" in message
    assert info.value.exit_code == 2


def test_broken_plugin_warns_and_others_load(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-broken", "broken", "fakeplug_broken", "raise ImportError('no lib')\n")
    monkeypatch.setenv("DBEVENTS_PLUGINS", "a,broken")
    with capture_logs() as logs:
        loaded = plugins_mod.load()
    assert loaded.names("sink") == ["pigeon"]
    [failure] = loaded.failures
    assert failure.plugin == "broken" and failure.distribution == "fake-broken"
    assert "no lib" in failure.error
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning == {"event": "plugin failed to load; skipped", "log_level": "warning",
                       "plugin": "broken", "distribution": "fake-broken",
                       "error": "ImportError: no lib"}


def test_plugins_command_reports_the_broken_plugin(site: Path) -> None:
    """The launcher as users run it (its own process, stderr not a terminal, so
    JSON logs), with the fake distributions on its path."""
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-broken", "broken", "fakeplug_broken", "raise ImportError('no lib')\n")
    env = {**os.environ, "PYTHONPATH": str(site), "DBEVENTS_PLUGINS": "a,broken"}
    r = subprocess.run([sys.executable, "-m", "dbevents.cli", "plugins"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    [_, row] = r.stdout.splitlines()
    assert row.split() == ["sink", "pigeon", "fake-sink-a", "1.2.3", "a"]
    err = r.stderr.splitlines()
    assert "failed to load: broken (fake-broken): ImportError: no lib" in err
    [warning] = [json.loads(line) for line in err if line.startswith("{")]
    assert warning["event"] == "plugin failed to load; skipped"
    assert warning["level"] == "warning"
    assert (warning["plugin"], warning["distribution"]) == ("broken", "fake-broken")


def test_restriction_skips_others(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-sink-b", "b", "fakeplug_b", GOOD.format(name="raven"))
    monkeypatch.setenv("DBEVENTS_PLUGINS", "b")
    assert plugins_mod.load().names("sink") == ["raven"]


def test_plugins_command_lists_and_marks_a_clash(site: Path) -> None:
    """Two plugins claiming one name: `dbevents plugins` still lists both (that is
    how a user finds which to uninstall); every other command refuses to run."""
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-sink-b", "b", "fakeplug_b", GOOD.format(name="pigeon"))
    r = run_cli(site, "a,b", "plugins")
    assert r.returncode == 2, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert rows == [["sink", "pigeon", "fake-sink-a", "1.2.3", "a", "CLASH"],
                    ["sink", "pigeon", "fake-sink-b", "1.2.3", "b", "CLASH"]]
    assert "two plugins claim the sink name 'pigeon'" in r.stderr
    other = run_cli(site, "a,b", "check")
    assert other.returncode == 2
    assert "fake-sink-a" in other.stderr and "fake-sink-b" in other.stderr


def test_plugins_command_lists_one_entry_point_from_two_distributions(site: Path) -> None:
    make_dist(site, "fake-sink-a", "a", "fakeplug_a", GOOD.format(name="pigeon"))
    make_dist(site, "fake-sink-b", "a", "fakeplug_b", GOOD.format(name="raven"))
    r = run_cli(site, "a", "plugins")
    assert r.returncode == 2, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert ["sink", "pigeon", "fake-sink-a", "1.2.3", "a", "CLASH"] in rows
    assert ["?", "a", "fake-sink-b", "1.2.3", "a", "CLASH"] in rows


def test_a_class_that_does_not_fit_its_protocol(site: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-sink-bad", "bad", "fakeplug_bad", """
from dbevents import hookimpl

class Half:
    async def open(self): ...

@hookimpl
def register_sinks(register):
    register("half", Half)
""")
    monkeypatch.setenv("DBEVENTS_PLUGINS", "bad")
    loaded = plugins_mod.load()
    assert loaded.names("sink") == []  # never handed to the engine
    with pytest.raises(PluginError) as info:
        loaded.check()
    message = str(info.value)
    assert "the sink 'half' from fake-sink-bad (entry point 'bad')" in message
    assert "does not fit the Sink protocol: Half has no batch_size, close, deliver" in message
    [row] = [i for i in loaded.all() if i.name == "half"]
    assert row.problem


def test_a_sink_and_a_matcher_declaring_one_key(site: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-sink-k", "k", "fakeplug_k",
              KEYED.format(key="batch_size", kind="sink", name="keyed", cls="Sink"))
    make_dist(site, "fake-matcher-m", "m", "fakeplug_m",
              KEYED.format(key="batch_size", kind="matcher", name="sieve", cls="Matcher"))
    monkeypatch.setenv("DBEVENTS_PLUGINS", "k,m")
    with pytest.raises(PluginError) as info:
        plugins_mod.load().check()
    message = str(info.value)
    assert "two plugins declare the trigger key 'batch_size'" in message
    assert "fake-sink-k" in message and "fake-matcher-m" in message


def test_a_plugin_key_shadowing_a_core_trigger_key(site: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-matcher-m", "m", "fakeplug_m",
              KEYED.format(key="timeout", kind="matcher", name="sieve", cls="Matcher"))
    monkeypatch.setenv("DBEVENTS_PLUGINS", "m")
    with pytest.raises(PluginError) as info:
        plugins_mod.load().check()
    assert "the matcher 'sieve' from fake-matcher-m (entry point 'm') declares the trigger " \
        "key 'timeout', which the core reads itself" in str(info.value)
