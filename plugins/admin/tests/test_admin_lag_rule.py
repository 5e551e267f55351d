"""The rule that turns the sources' probe facts and the captured changes into
`dbevents_source_lag_seconds` at a given moment (the end-to-end tests in
tests/test_e2e_lag.py run it against MariaDB; here every branch, at set times)."""

from __future__ import annotations

from datetime import UTC, datetime

from dbevents import Change, Operation
from dbevents.config import Config, DatabaseConfig, EventingConfig
from dbevents.observers import ObserverContext
from dbevents.testing import isolated_plugins
from dbevents_admin.metrics import AdminMetrics, SourceState, caught_up
from dbevents_admin.options import Options


def metrics(engine: bool = True) -> AdminMetrics:
    config = Config(eventing=EventingConfig(store="memory://lag", source_id="x"),
                    databases={"app": DatabaseConfig("app", "memory", "memory://db")},
                    triggers=(), services={"admin": Options()})
    return AdminMetrics(ObserverContext(config=config, plugins=isolated_plugins()),
                        engine=engine)


def change(at: float) -> Change:
    return Change("app", "memory", "t", Operation.INSERT, "k", datetime.fromtimestamp(at, UTC))


def test_caught_up_from_the_facts() -> None:
    assert caught_up({"caught_up": True, "lag_bytes": 500})  # said outright: it wins
    assert not caught_up({"caught_up": False, "lag_bytes": 0})
    assert caught_up({"lag_bytes": 0}) and not caught_up({"lag_bytes": 1})
    assert not caught_up({"lag_bytes": True}) and not caught_up({"slot": "s"})


def test_lag_at_a_moment() -> None:
    m = metrics()
    assert m.since is not None
    state = m.sources["app"]
    state.probed, state.probed_at = True, 1000.0

    state.facts = {"caught_up": True}
    assert m.source_lag(state, 5000.0) == 0
    # Behind: from the later of the last commit captured and the last caught-up probe.
    state.facts = {"caught_up": False, "lag_bytes": 40}
    m.captured("app", [change(900.0)], [], 0.1)
    assert m.source_lag(state, 1000.0) == 100
    state.caught_up_at = 950.0
    assert m.source_lag(state, 1000.0) == 50
    assert m.source_lag(state, 1030.0) == 80  # it grows while nothing moves
    m.captured("app", [change(990.0)], [], 0.1)
    assert m.source_lag(state, 1030.0) == 40
    # The probe's own age of the oldest waiting change, aged since it was asked.
    state.facts = {"caught_up": False, "lag_seconds": 30.0}
    assert m.source_lag(state, 1005.0) == 35
    # A failed probe (the database is down): from what is known, growing.
    state.facts = None
    assert m.source_lag(state, 1100.0) == 110


def test_lag_without_a_probe_or_without_an_engine() -> None:
    m = metrics()
    state = m.sources["app"]
    assert m.source_lag(state, 1000.0) is None  # nothing captured yet
    m.captured("app", [change(900.0)], [], 2.5)
    assert m.source_lag(state, 5000.0) == 2.5  # no probe: the lag at capture

    # `dbevents console`: behind since it cannot tell when, so left out.
    console = metrics(engine=False)
    state = console.sources["app"]
    state.probed, state.probed_at, state.facts = True, 1000.0, {"lag_bytes": 10}
    assert console.source_lag(state, 1000.0) is None
    state.facts = {"lag_bytes": 0}
    assert console.source_lag(state, 1000.0) == 0


def test_refresh_sets_the_gauge() -> None:
    m = metrics()
    m.sources["app"] = SourceState(probed=True, probed_at=1.0, facts={"lag_bytes": 0})
    m.refresh_lag(2.0)
    assert m.registry.get_sample_value("dbevents_source_lag_seconds",
                                       {"database": "app"}) == 0
