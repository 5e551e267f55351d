"""The plugin: the [admin] service in `dbevents run`, and `dbevents console`."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import attrs
import click
import structlog
from aiohttp import web
from dbevents import DbeventsError, SetupError, hookimpl
from dbevents.protocols import ServiceContext, Store

from dbevents_admin.app import METRICS, build_app
from dbevents_admin.metrics import AdminMetrics
from dbevents_admin.options import Options as AdminOptions

log = structlog.get_logger("dbevents.admin")


class AdminService:
    """The admin API and console, served by `dbevents run` when [admin] is set."""

    Options = AdminOptions

    def __init__(self, options: AdminOptions | None, context: ServiceContext) -> None:
        self.options = options or AdminOptions()
        self.context = context
        self.runner: web.AppRunner | None = None
        self.poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        opts = self.options
        found = self.context.observer("admin")
        metrics = found if isinstance(found, AdminMetrics) else None
        app = build_app(self.context, opts, metrics)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, opts.host, opts.port).start()
        except OSError as exc:
            await self.runner.cleanup()
            self.runner = None
            raise SetupError(f"the admin server cannot listen on {opts.listen}: "
                             f"{exc.strerror or exc}; change admin.listen") from None
        if opts.bearer is None:
            log.warning("admin API without a token: any local user can use it; set "
                        "admin.token to require one")
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        log.info("admin listening", url=f"http://{host}:{opts.port}/",
                 token=opts.bearer is not None)
        # Under `dbevents console` too: the sources' probes give their lag.
        self.poller = asyncio.create_task(app[METRICS].poll(self.context),
                                          name="admin-metrics")

    async def close(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            await asyncio.gather(self.poller, return_exceptions=True)
            self.poller = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@attrs.frozen
class ConsoleContext:
    """`dbevents console`'s ServiceContext: the store read by this process alone;
    a worker notices redeliveries through the store."""

    store: Store
    config: Any
    plugins: Any

    def wake(self) -> None:
        pass

    def observer(self, name: str) -> None:
        return None  # no engine runs in `dbevents console`


@click.command("console")
@click.option("--listen", help="HOST:PORT (default: admin.listen, else 127.0.0.1:8642).")
@click.pass_obj
def console(state: Any, listen: str | None) -> None:
    """Serve the admin API and web console from the store, without capturing."""
    try:
        cfg = state.config
        options = cfg.services.get("admin") or AdminOptions()
        if listen is not None:
            options = attrs.evolve(options, listen=listen)
        store = state.store("admin")
    except DbeventsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)

    async def main() -> None:
        await store.open()
        service = AdminService(options, ConsoleContext(store, cfg, state.plugins))
        try:
            await service.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await service.close()
            await store.close()

    try:
        asyncio.run(main())
    except DbeventsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


@hookimpl
def register_services(register: Any) -> None:
    register("admin", AdminService)


@hookimpl
def register_observers(register: Any) -> None:
    register("admin", AdminMetrics)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(console)
