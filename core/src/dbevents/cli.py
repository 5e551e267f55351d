"""The `dbevents` launcher."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import Any, TypeVar

import click
import structlog

from dbevents import config as config_mod
from dbevents import logs, masking
from dbevents import plugins as plugins_mod
from dbevents.durations import format_duration, parse_duration
from dbevents.engine import Engine, make_store
from dbevents.envelope import request_body
from dbevents.errors import DbeventsError
from dbevents.hints import command
from dbevents.masking import mask_dsn, mask_url, scrub
from dbevents.protocols import (
    EventFilter,
    Problem,
    SourceSettings,
    Store,
    StoreRole,
    TriggerStats,
    capture_leasing,
    in_flight_counts,
    status_probe,
    trigger_pauses,
)
from dbevents.values import Event, Status

T = TypeVar("T")
log = structlog.get_logger("dbevents.cli")


def _version() -> str:
    try:
        return version("dbevents")
    except PackageNotFoundError:
        return "unknown"


class State:
    def __init__(self, config_path: str | None, plugins: plugins_mod.Plugins) -> None:
        self.config_path = config_mod.config_path(config_path)
        self.plugins = plugins
        self._config: config_mod.Config | None = None

    @property
    def config(self) -> config_mod.Config:
        if self._config is None:
            self._config = config_mod.load(self.config_path, self.plugins)
            # Defence in depth: whatever a driver echoes back (a password it split
            # differently, a URL in its own error text) is scrubbed from every log
            # line and every message below, not only what our masking formats.
            masking.add_secrets(masking.secrets_in(self._config))
        return self._config

    def store(self, role: StoreRole = "admin") -> Store:
        cfg = self.config
        return make_store(cfg.eventing.store, self.plugins, cfg.dir, role=role)


def fail(exc: DbeventsError) -> None:
    logs.flush()  # log lines still waiting come first, as they happened
    click.echo(scrub(f"error: {exc}"), err=True)
    sys.exit(exc.exit_code)


def run_async(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except DbeventsError as exc:
        fail(exc)
        raise  # unreachable


async def with_store(state: State, body: Callable[[Store], Awaitable[T]]) -> T:
    store = state.store()
    await store.open()
    try:
        return await body(store)
    finally:
        await store.close()


def _hoist_config(args: list[str]) -> list[str]:
    """``--config`` given after the command (``dbevents run --config x.toml``, or
    ``dbevents events list --config x.toml``) moved in front of it, where the
    launcher reads it. Order is kept, so the last one given still wins; nothing
    after ``--`` is touched."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg.startswith("--config="):
            front.append(arg)
        elif arg == "--config":
            if i + 1 == len(args):
                raise click.UsageError("Option '--config' requires an argument.")
            front.extend(args[i:i + 2])
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


class Launcher(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist_config(args))


@click.group(cls=Launcher, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="dbevents")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config file (default: $DBEVENTS_CONFIG, else ./dbevents.toml). "
                   "May also follow the command: dbevents run --config x.toml.")
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None,
              help="Default: console on a terminal, JSON otherwise.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, log_format: str | None,
        log_level: str) -> None:
    """dbevents: database changes in, CloudEvents webhooks out."""
    masking.forget_secrets()  # a new invocation (tests run many in one process)
    logs.setup(log_format, log_level)
    plugins: plugins_mod.Plugins = ctx.obj
    # Clashing or misfit plugins stop every command but the one that lists them.
    if ctx.invoked_subcommand != "plugins":
        try:
            plugins.check()
        except DbeventsError as exc:
            fail(exc)
    ctx.obj = State(config_path, plugins)


@cli.command()
@click.pass_obj
def run(state: State) -> None:
    """Capture changes and deliver events until SIGINT or SIGTERM."""
    try:
        cfg = state.config
    except DbeventsError as exc:
        fail(exc)
    if not cfg.eventing.enabled:
        click.echo("eventing is disabled ([eventing] enabled = false); nothing to do.")
        return
    try:
        engine = Engine(cfg, state.plugins)
    except DbeventsError as exc:
        fail(exc)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            # The first signal stops gracefully; a second one exits at once
            # (attempts in flight are then delivered again after a restart).
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("stopping: finishing attempts in flight (signal again to exit now)")
                engine.stop()
            else:
                log.warning("second signal: exiting now")
                logs.flush()  # os._exit runs no atexit hooks
                os._exit(130)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await engine.run()

    try:
        asyncio.run(main())
    except DbeventsError as exc:
        fail(exc)
    finally:
        logs.flush()  # the lines still waiting, before anything printed after


@cli.command()
@click.option("--connect", is_flag=True,
              help="Also connect to every database and the store and run their startup "
                   "checks, listing every problem (creates nothing, captures nothing).")
@click.pass_obj
def check(state: State, connect: bool) -> None:
    """Validate the config and the plugins it needs; exit 0 if usable, else 2."""
    try:
        cfg = state.config
        store = make_store(cfg.eventing.store, state.plugins, cfg.dir)
    except DbeventsError as exc:
        fail(exc)
    click.echo(f"config: {cfg.path}")
    click.echo(f"eventing: {'enabled' if cfg.eventing.enabled else 'DISABLED'}, "
               f"store {mask_dsn(cfg.eventing.store)}, retention "
               f"{format_duration(cfg.eventing.retention)}")
    click.echo(f"databases ({len(cfg.databases)}):")
    for db in cfg.databases.values():
        click.echo(f"  {db.name}: {db.type} {mask_dsn(db.url)}")
    click.echo(f"triggers ({len(cfg.triggers)}):")
    for t in cfg.triggers:
        dbs = ",".join(sorted(t.databases)) if t.databases else "*"
        tables = ",".join(sorted(t.tables)) if t.tables else "*"
        ops = ",".join(sorted(o.value for o in t.operations))
        click.echo(f"  {t.name}: {dbs} / {tables} / {ops} -> {t.sink} {mask_url(t.url)} "
                   f"(retries {t.retries}, timeout {t.timeout} ms)")
    if not connect:
        click.echo(f"ok (config only: no database or store was contacted; "
                   f"`{command('check --connect')}` runs their startup checks)")
        return
    try:
        # Building the parts connects nothing; preflight() then only reads.
        engine = Engine(cfg, state.plugins, store=store)
    except DbeventsError as exc:
        fail(exc)
    parts: list[tuple[str, str, Any]] = [
        (f"{name} ({cfg.databases[name].type} {mask_dsn(cfg.databases[name].url)})",
         cfg.databases[name].url, source) for name, source in engine.sources.items()]
    parts.append((f"store {mask_dsn(cfg.eventing.store)}", cfg.eventing.store, store))
    click.echo("connecting:")
    results = asyncio.run(_preflight_all(parts))
    failed = False
    for (label, _, _), problems in zip(parts, results, strict=True):
        if problems is None:
            click.echo(f"  {label}: not checked (its plugin has no preflight checks)")
        elif not problems:
            click.echo(f"  {label}: ok")
        else:
            failed = True
            click.echo(f"  {label}: {len(problems)} problem(s)")
            for problem in problems:
                click.echo("    - " + problem.message.replace("\n", "\n      "))
    if failed:
        click.echo("not ready: fix the problems above and run the check again")
        sys.exit(2)
    click.echo("ok")


async def _preflight_all(parts: list[tuple[str, str, Any]]) -> list[list[Problem] | None]:
    """Every part's preflight at once; a check that crashes is a problem too."""
    async def one(url: str, part: Any) -> list[Problem] | None:
        preflight = getattr(part, "preflight", None)
        if preflight is None:
            return None
        try:
            return list(await preflight())
        except Exception as exc:
            text = str(exc).replace(url, mask_dsn(url)) if url else str(exc)
            return [Problem(f"the check itself failed: {type(exc).__name__}: {text}")]

    return list(await asyncio.gather(*(one(url, part) for _, url, part in parts)))


@cli.command("plugins")
@click.pass_obj
def plugins_cmd(state: State) -> None:
    """List installed plugins: kind, name, distribution, version; mark problems.

    Exits 2 when two plugins clash or one does not fit its protocol (every other
    command then refuses to run), after listing everything."""
    plugins = state.plugins
    conflicts = plugins.key_conflicts()
    in_conflict = {id(i) for _, infos in conflicts for i in infos}

    def note(i: plugins_mod.PluginInfo) -> str:
        if (i.kind, i.name) in plugins.claimed_twice or i.plugin in plugins.clashes:
            return "CLASH"  # a name two plugins claim (both rows are marked)
        if i.problem:
            return "MISFIT"
        return "KEY CLASH" if id(i) in in_conflict else ""

    header = ("KIND", "NAME", "DISTRIBUTION", "VERSION", "ENTRY POINT", "")
    rows = [(i.kind, i.name, i.distribution, i.version, i.plugin, note(i))
            for i in plugins.all()]
    # Plugins that only add commands (or nothing) are listed too, and so is a
    # distribution whose entry point name another one already took.
    named = {i.plugin for i in plugins.all()}
    rows += [("?", name, dist, ver or "?", name, "CLASH") if module is None else
             ("commands", name, dist, ver or "?", name, "CLASH" if name in plugins.clashes
              else "")
             for module, name, dist, ver in plugins.modules
             if module is None or name not in named]
    widths = [max([len(h)] + [len(r[c]) for r in rows]) for c, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    click.echo(fmt.format(*header).rstrip())
    for r in rows:
        click.echo(fmt.format(*r).rstrip())
    for f in plugins.failures:
        click.echo(f"failed to load: {f.plugin} ({f.distribution}): {f.error}", err=True)
    problems = plugins.problems()
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(2)


# -- the event log ---------------------------------------------------------------


def _event_dict(ev: Any) -> dict[str, Any]:
    return {
        "id": ev.id, "trigger": ev.trigger, "database": ev.database, "table": ev.table,
        "docId": ev.doc_id, "type": ev.type, "status": ev.status.value,
        "attempts": ev.attempts,
        "created_at": ev.created_at.isoformat() if ev.created_at else None,
        "updated_at": ev.updated_at.isoformat() if ev.updated_at else None,
        "next_attempt_at": ev.next_attempt_at.isoformat() if ev.next_attempt_at else None,
        "last_error": ev.last_error,
    }


@cli.group()
def events() -> None:
    """Look at and act on the event log."""


@events.command("list")
@click.option("--status", type=click.Choice([s.value for s in Status]))
@click.option("--trigger")
@click.option("--database")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def events_list(state: State, status: str | None, trigger: str | None, database: str | None,
                limit: int, as_json: bool) -> None:
    """The newest events first."""
    flt = EventFilter(status=Status(status) if status else None, trigger=trigger,
                      database=database, limit=limit)
    evs = run_async(with_store(state, lambda s: s.list_events(flt)))
    if as_json:
        for ev in evs:
            click.echo(scrub(json.dumps(_event_dict(ev))))
        return
    click.echo(f"{'ID':<36}  {'TRIGGER':<20} {'TYPE':<10} {'STATUS':<10} {'ATT':>3}  "
               f"{'TABLE':<20} DOCID")
    for ev in evs:
        click.echo(scrub(f"{ev.id:<36}  {ev.trigger[:20]:<20} {ev.type:<10} "
                         f"{ev.status.value:<10} {ev.attempts:>3}  {ev.table[:20]:<20} "
                         f"{ev.doc_id}"))


SHOW_MATCHES = 10  # ids listed when a prefix is ambiguous


class _Ambiguous(DbeventsError):
    exit_code = 1


@events.command("show")
@click.argument("event_id")
@click.option("--body", "body_of", type=int, metavar="N",
              help="Print only the exact request body attempt N sent.")
@click.pass_obj
def events_show(state: State, event_id: str, body_of: int | None) -> None:
    """One event: its payload and every attempt. EVENT_ID may be the start of an
    id, if only one event's id starts so."""
    async def body(store: Store) -> Any:
        nonlocal event_id
        ev = await store.get_event(event_id)
        find = getattr(store, "find_event_ids", None)
        if ev is None and find is not None:
            matches = await find(event_id, SHOW_MATCHES + 1)
            if len(matches) > 1:
                count = (f"more than {SHOW_MATCHES}" if len(matches) > SHOW_MATCHES
                         else str(len(matches)))
                raise _Ambiguous(f"{count} events have an id starting with {event_id!r}; "
                                 "give more of it:\n  " + "\n  ".join(matches[:SHOW_MATCHES]))
            if matches:
                event_id = matches[0]
                ev = await store.get_event(event_id)
        attempts = await store.attempts(event_id) if ev is not None else []
        members: list[Event] = []
        chosen = [a for a in attempts if a.number == body_of]
        if chosen and chosen[-1].request_id is not None:
            members = await store.list_events(EventFilter(
                request_id=chosen[-1].request_id, limit=max(1, chosen[-1].batch_size)))
        return ev, attempts, chosen, members

    ev, attempts, chosen, members = run_async(with_store(state, body))
    if ev is None:
        click.echo(f"error: no event with id {event_id}", err=True)
        sys.exit(1)
    if body_of is not None:
        if not chosen:
            click.echo(f"error: event {event_id} has no attempt {body_of}", err=True)
            sys.exit(1)
        sent = request_body(ev, chosen[-1], members)
        if sent is None:
            click.echo(f"error: attempt {body_of} went out in a batch of "
                       f"{chosen[-1].batch_size} events, of which only {len(members)} are "
                       "still in the event log (the others were purged)", err=True)
            sys.exit(1)
        # The exact bytes sent: the receiver saw them, so they are shown unchanged.
        click.echo(sent.decode("utf-8", "replace"))
        return
    out = _event_dict(ev)
    out["payload"] = json.loads(ev.payload)
    out["attempts_log"] = [
        {"number": a.number, "started_at": a.started_at.isoformat(),
         "duration_ms": round(a.duration_ms, 1), "ok": a.ok, "status_code": a.status_code,
         "error": a.error, "request_headers": dict(a.request_headers),
         "response_body": a.response_body, "batch_size": a.batch_size,
         "request_id": a.request_id, "batch_index": a.batch_index}
        for a in attempts
    ]
    click.echo(scrub(json.dumps(out, indent=2)))


@events.command("redeliver")
@click.argument("ids", nargs=-1)
@click.option("--status", type=click.Choice(["failed", "delivered"]))
@click.option("--trigger")
@click.pass_obj
def events_redeliver(state: State, ids: tuple[str, ...], status: str | None,
                     trigger: str | None) -> None:
    """Put events back to pending with attempts reset: by id, or --status failed."""
    if not ids and not status:
        raise click.UsageError("give event ids, or --status failed")
    n = run_async(with_store(state, lambda s: s.redeliver(
        list(ids) if ids else None, Status(status) if status else None, trigger)))
    log.info("redeliver", events=n, ids=len(ids) or None, status=status, trigger=trigger)
    click.echo(f"{n} event(s) queued for redelivery")
    if ids and n < len(ids):
        sys.exit(1)


@events.command("purge")
@click.option("--older-than", "older", required=True, help="e.g. 7d, 12h")
@click.option("--status", type=click.Choice(["delivered", "failed"]), multiple=True)
@click.option("--trigger", help="Only this trigger's events.")
@click.pass_obj
def events_purge(state: State, older: str, status: tuple[str, ...],
                 trigger: str | None) -> None:
    """Delete finished events (and their attempts) older than a duration."""
    try:
        seconds = parse_duration(older)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    statuses = [Status(s) for s in status] or [Status.DELIVERED, Status.FAILED]
    before = datetime.now(UTC) - timedelta(seconds=seconds)
    n = run_async(with_store(state, lambda s: s.purge(before, statuses, trigger)))
    click.echo(f"{n} event(s) purged")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(state: State, as_json: bool) -> None:
    """Per trigger: event counts by status; per source: checkpoint and lag; per
    worker (a shared store): the events it holds in flight."""
    cfg = _config_or_fail(state)

    async def body(store: Store) -> Any:
        stats = await store.stats()
        pauses = trigger_pauses(store)
        paused = await pauses.paused_triggers() if pauses is not None else {}
        stats += [TriggerStats(t) for t in sorted(set(paused) - {s.trigger for s in stats})]
        cps = await store.checkpoints()
        leasing = capture_leasing(store)
        leases = {lease.source: lease for lease in await leasing.capture_leases()} \
            if leasing is not None else {}
        sources = {}
        for name, db in cfg.databases.items():
            info: dict[str, Any] = {"type": db.type, "checkpoint": str(cps[name])
                                    if name in cps else None}
            lease = leases.get(name)
            if lease is not None:  # which process captures it (several share the config)
                info["holder"] = lease.holder if lease.live else None
                info["lease_token"] = lease.token
            probe = status_probe(state.plugins.get("source", db.type))
            if probe is not None:
                settings = SourceSettings(name=name, url=db.url, options=db.options,
                                          config_dir=cfg.dir, checkpoint=cps.get(name))
                try:
                    info.update(await probe(settings))
                except Exception as exc:  # the database may be down; say so, don't fail
                    info["probe"] = _probe_failure(exc)
            sources[name] = info
        # Per worker: events it holds leased now, and the sources it captures
        # (a capturing worker shows with none in flight too).
        counting = in_flight_counts(store)
        workers: dict[str, dict[str, Any]] = {}
        if counting is not None:
            for worker, n in (await counting.in_flight()).items():
                workers[worker] = {"worker": worker, "in_flight": n, "captures": []}
            for name, lease in sorted(leases.items()):
                if lease.live:
                    workers.setdefault(lease.holder, {"worker": lease.holder, "in_flight": 0,
                                                      "captures": []})["captures"].append(name)
        return stats, paused, sources, [workers[w] for w in sorted(workers)] \
            if counting is not None else None

    stats, paused, sources, workers = run_async(with_store(state, body))

    def since(trigger: str) -> str | None:
        moment = paused.get(trigger)
        return moment.isoformat() if moment is not None else None

    if as_json:
        click.echo(scrub(json.dumps({
            "triggers": [{"trigger": s.trigger, "pending": s.pending,
                          "delivering": s.delivering, "delivered": s.delivered,
                          "failed": s.failed, "paused_since": since(s.trigger)}
                         for s in stats],
            "sources": sources,
            **({"workers": workers} if workers is not None else {})}, indent=2)))
        return
    click.echo(f"{'TRIGGER':<24} {'PENDING':>8} {'DELIVERING':>10} {'DELIVERED':>10} "
               f"{'FAILED':>7}  STATE")
    for s in stats:
        state_ = f"paused since {since(s.trigger)} (receiver down)" if s.trigger in paused \
            else "delivering"
        click.echo(f"{s.trigger[:24]:<24} {s.pending:>8} {s.delivering:>10} {s.delivered:>10} "
                   f"{s.failed:>7}  {state_}")
    click.echo("")
    click.echo(f"{'SOURCE':<24} {'TYPE':<10} CHECKPOINT / LAG")
    for name, info in sources.items():
        extra = " ".join(f"{k}={v}" for k, v in info.items() if k not in ("type", "checkpoint"))
        click.echo(scrub(f"{name[:24]:<24} {info['type']:<10} {info['checkpoint']} "
                         f"{extra}".rstrip()))
    if workers is not None:
        click.echo("")
        click.echo(f"{'WORKER':<40} {'IN FLIGHT':>9}  CAPTURES")
        for w in workers:
            click.echo(f"{w['worker']:<40} {w['in_flight']:>9}  "
                       f"{', '.join(w['captures']) or '-'}")
        if not workers:
            click.echo("(none holds events or captures right now)")


# What a driver's error text says when the database is not there at all.
_UNREACHABLE = (("connection refused", "connection refused"),
                ("timed out", "timed out"), ("timeout", "timed out"),
                ("no route to host", "no route to host"),
                ("network is unreachable", "network is unreachable"))


def _probe_failure(exc: BaseException) -> str:
    """Why a source's status probe failed, in words (as `run` says it), masked."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    lowered = text.lower()
    for words, reason in _UNREACHABLE:
        if words in lowered:
            return f"unreachable: {reason}"
    return "unavailable: " + scrub(first)


def _config_or_fail(state: State) -> config_mod.Config:
    try:
        return state.config
    except DbeventsError as exc:
        fail(exc)
        raise


def build(plugins: plugins_mod.Plugins) -> click.Group:
    plugins.add_commands(cli)
    return cli


def _scrubbed_excepthook(kind: type[BaseException], exc: BaseException,
                         tb: TracebackType | None) -> None:
    # A bug's traceback may quote a driver's error text: known secrets out of it too.
    text = "".join(traceback.format_exception(kind, exc, tb))
    sys.stderr.write(masking.scrub(text))


def main(argv: list[str] | None = None) -> None:
    sys.excepthook = _scrubbed_excepthook
    # Loading plugins may warn before --log-format is parsed: those lines go to
    # stderr like every other, never into a command's stdout.
    logs.setup()
    try:
        plugins = plugins_mod.load()
    except DbeventsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    build(plugins).main(args=argv, obj=plugins, prog_name="dbevents")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])

