"""The launcher, in-process with click's runner and the in-memory plugins."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
from click.testing import CliRunner
from dbevents.cli import build
from dbevents.plugins import module_from
from dbevents.protocols import SourceSettings, StoreSettings
from dbevents.testing import MemoryStore, isolated_plugins, make_event, reset
from dbevents.testing.memory import MemorySource
from dbevents.values import Attempt, Finish, Status


@pytest.fixture(autouse=True)
def _clean() -> None:
    reset()


def invoke(tmp_path: Path, toml: str | None, *args: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "dbevents.toml"
    if toml is not None:
        path.write_text(toml)
    plugins = isolated_plugins()
    return CliRunner().invoke(build(plugins), ["--config", str(path), *args], obj=plugins)


GOOD = """
[eventing]
store = "memory://cli"
[databases.app]
type = "memory"
url = "memory://db?password=x"
[[triggers]]
name = "t"
url = "https://hooks.example.com/secret-token-path"
sink = "memory"
"""


def test_check_ok_prints_summary_without_secrets(tmp_path: Path) -> None:
    r = invoke(tmp_path, GOOD.replace("memory://db?password=x", "memory://u:pw@db"), "check")
    assert r.exit_code == 0, r.output
    assert "app: memory memory://u:***@db" in r.output
    assert "t: * / * / delete,insert,update -> memory https://hooks.example.com/***" in r.output
    assert "pw@" not in r.output and "secret-token-path" not in r.output


@pytest.mark.parametrize(("toml", "words"), [
    (None, "config file not found"),
    ("[eventing\n", "TOML syntax error"),
    (GOOD.replace('name = "t"', 'name = "t"\ntimeout = "5s"'), "triggers[0].timeout"),
    (GOOD.replace("memory://cli", "nosuch://x"), "installed stores: memory"),
])
def test_check_bad_config_exits_2(tmp_path: Path, toml: str | None, words: str) -> None:
    r = invoke(tmp_path, toml, "check")
    assert r.exit_code == 2
    assert words in r.output


def test_run_bad_config_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    r = invoke(tmp_path, GOOD.replace('type = "memory"', 'type = "oracle"'), "run")
    assert r.exit_code == 2 and "unknown database type 'oracle'" in r.output


def test_disabled_exits_0(tmp_path: Path) -> None:
    r = invoke(tmp_path, GOOD.replace("[eventing]", "[eventing]\nenabled = false"), "run")
    assert r.exit_code == 0 and "disabled" in r.output


def test_plugins_lists_kind_name_distribution(tmp_path: Path) -> None:
    r = invoke(tmp_path, None, "plugins")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "ENTRY", "POINT"]
    assert any(line.split()[:3] == ["source", "memory", "memory"] for line in lines)


def test_version(tmp_path: Path) -> None:
    r = invoke(tmp_path, None, "--version")
    assert r.exit_code == 0 and r.output.startswith("dbevents, version ")


def _seed() -> list[str]:
    async def go() -> list[str]:
        store = MemoryStore(StoreSettings(url="memory://cli"))
        evs = [make_event(doc_id=str(i)) for i in range(3)]
        await store.enqueue(evs, {})
        await store.claim({"t": 10}, 30, __import__("datetime").datetime.now(
            __import__("datetime").UTC))
        now = __import__("datetime").datetime.now(__import__("datetime").UTC)
        await store.finish([
            Finish(evs[0].id, Attempt(evs[0].id, 1, now, 3.0, False, 500, "boom", "HTTP 500"),
                   Status.FAILED),
            Finish(evs[1].id, Attempt(evs[1].id, 1, now, 2.0, True, 200), Status.DELIVERED),
        ])
        return [e.id for e in evs]

    return asyncio.run(go())


def test_events_list_show_redeliver_purge_status(tmp_path: Path) -> None:
    ids = _seed()
    r = invoke(tmp_path, GOOD, "events", "list", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert {row["status"] for row in rows} == {"failed", "delivered", "delivering"}

    r = invoke(tmp_path, GOOD, "events", "list", "--status", "failed")
    assert ids[0] in r.output and ids[1] not in r.output

    r = invoke(tmp_path, GOOD, "events", "show", ids[0])
    shown = json.loads(r.output)
    assert shown["payload"]["id"] == ids[0]
    assert shown["attempts_log"][0]["status_code"] == 500
    assert shown["attempts_log"][0]["error"] == "HTTP 500"

    r = invoke(tmp_path, GOOD, "events", "show", "nope")
    assert r.exit_code == 1 and "no event" in r.output

    r = invoke(tmp_path, GOOD, "events", "redeliver", "--status", "failed")
    assert r.exit_code == 0 and "1 event(s) queued" in r.output
    r = invoke(tmp_path, GOOD, "events", "list", "--status", "pending", "--json")
    assert [json.loads(line)["id"] for line in r.output.splitlines()] == [ids[0]]

    r = invoke(tmp_path, GOOD, "status", "--json")
    st = json.loads(r.output)
    assert st["triggers"] == [{"trigger": "t", "pending": 1, "delivering": 1, "delivered": 1,
                               "failed": 0, "paused_since": None}]
    assert st["sources"]["app"]["type"] == "memory"

    r = invoke(tmp_path, GOOD, "events", "purge", "--older-than", "0s", "--status", "delivered")
    assert r.exit_code == 0 and "1 event(s) purged" in r.output
    r = invoke(tmp_path, GOOD, "events", "purge", "--older-than", "soon")
    assert r.exit_code == 2


class FileSource(MemorySource):
    """A source reading a file whose URL may be relative to the config's folder."""

    @classmethod
    async def probe_status(cls, settings: SourceSettings) -> Mapping[str, Any]:
        path = settings.config_dir / settings.url.removeprefix("file:")
        return {"bytes": len(path.read_bytes())}


def test_status_probes_each_source_with_the_config_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One mechanism: `dbevents status` calls the source's declared async probe with
    its settings, so a relative URL resolves against the config file's folder
    whatever the working directory."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "data.log").write_bytes(b"12345")
    monkeypatch.chdir(tmp_path)
    plug = module_from("files", register_sources=lambda register: register("file", FileSource))
    plugins = isolated_plugins(("files", plug))
    path = tmp_path / "cfg" / "dbevents.toml"
    path.write_text('[eventing]\nstore = "memory://cli"\n'
                    '[databases.logs]\ntype = "file"\nurl = "file:data.log"\n')
    r = CliRunner().invoke(build(plugins), ["--config", str(path), "status", "--json"],
                           obj=plugins)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["sources"]["logs"] == {"type": "file", "checkpoint": None,
                                                       "bytes": 5}


def test_a_store_role_is_worker_or_admin() -> None:
    assert StoreSettings(url="memory://x").role == "worker"
    with pytest.raises(ValueError, match="'role' must be in"):
        StoreSettings(url="memory://x", role="viewer")  # type: ignore[arg-type]


def invoke_args(*args: str):  # type: ignore[no-untyped-def]
    plugins = isolated_plugins()
    return CliRunner().invoke(build(plugins), list(args), obj=plugins)


@pytest.mark.parametrize("args", [
    ("check", "--config", "{path}"),
    ("check", "--config={path}"),
    ("status", "--json", "--config", "{path}"),
    ("events", "list", "--config", "{path}", "--json"),
    ("events", "--config", "{path}", "list", "--json"),
    ("--log-level", "warning", "events", "purge", "--older-than", "1d", "--config", "{path}"),
])
def test_config_after_the_command(tmp_path: Path, args: tuple[str, ...]) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text(GOOD)
    r = invoke_args(*(a.format(path=path) for a in args))
    assert r.exit_code == 0, r.output


def test_config_after_the_command_wins_over_the_one_before(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "missing.toml"
    good.write_text(GOOD)
    r = invoke_args("--config", str(bad), "check", "--config", str(good))
    assert r.exit_code == 0, r.output
    assert f"config: {good}" in r.output


def test_config_after_the_command_needs_a_value(tmp_path: Path) -> None:
    r = invoke_args("check", "--config")
    assert r.exit_code == 2 and "'--config' requires an argument" in r.output


@pytest.mark.parametrize(("retention", "shown"), [
    (None, "retention 7d"), ('"12h"', "retention 12h"), ('"90m"', "retention 90m"),
    ("45", "retention 45s"),
])
def test_check_prints_durations_as_written(tmp_path: Path, retention: str | None,
                                           shown: str) -> None:
    toml = GOOD if retention is None else GOOD.replace(
        "[eventing]", f"[eventing]\nretention = {retention}")
    r = invoke(tmp_path, toml, "check")
    assert r.exit_code == 0, r.output
    assert shown in r.output
    assert "days," not in r.output and "0:00" not in r.output


def test_events_show_takes_a_unique_id_prefix(tmp_path: Path) -> None:
    ids = ["2b9f0000-aaaa", "2b9f1111-bbbb", "7c3e2222-cccc"]

    async def seed() -> None:
        store = MemoryStore(StoreSettings(url="memory://cli"))
        await store.enqueue([attrs.evolve(make_event(doc_id=str(i)), id=id_)
                             for i, id_ in enumerate(ids)], {})

    asyncio.run(seed())
    r = invoke(tmp_path, GOOD, "events", "show", "7c3e")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["id"] == ids[2]

    r = invoke(tmp_path, GOOD, "events", "show", "2b9f")
    assert r.exit_code == 1
    assert "2 events have an id starting with '2b9f'; give more of it" in r.output
    assert ids[0] in r.output and ids[1] in r.output and ids[2] not in r.output

    r = invoke(tmp_path, GOOD, "events", "show", "2b9f1")
    assert r.exit_code == 0 and json.loads(r.output)["id"] == ids[1]
    r = invoke(tmp_path, GOOD, "events", "show", "9")
    assert r.exit_code == 1 and "no event with id 9" in r.output


def test_status_shows_a_paused_trigger_and_since_when(tmp_path: Path) -> None:
    """The running process records a pause in the store; `status` (another
    process, here another store instance on the same data) shows it."""
    from datetime import UTC, datetime

    from dbevents.protocols import StoreSettings
    from dbevents.testing.memory import MemoryStore

    since = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)

    async def pause() -> None:
        store = MemoryStore(StoreSettings(url="memory://cli-paused"))
        await store.open()
        await store.set_trigger_paused("t", since)

    asyncio.run(pause())
    toml = GOOD.replace("memory://cli", "memory://cli-paused")
    r = invoke(tmp_path, toml, "status", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["triggers"] == [
        {"trigger": "t", "pending": 0, "delivering": 0, "delivered": 0, "failed": 0,
         "paused_since": since.isoformat()}]
    r = invoke(tmp_path, toml, "status")
    assert "paused since 2026-12-05T18:00:00+00:00 (receiver down)" in r.output
