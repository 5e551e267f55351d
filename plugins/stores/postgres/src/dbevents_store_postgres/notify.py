"""LISTEN for enqueues by other processes, on a connection of its own.

Every transaction that makes work claimable (enqueue, release, redeliver) sends
``NOTIFY`` on the store's channel; PostgreSQL delivers it at commit, so an idle
worker in another process wakes as soon as the work is visible to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import psycopg
import structlog
from dbevents.backoff import Backoff
from psycopg import sql

from dbevents_store_postgres.url import Location

log = structlog.get_logger("dbevents.store.postgres")


class Listener:
    """Calls every registered wake function on each notification. Reconnects
    after a lost connection, and wakes once after (re)connecting, since a
    notification sent while nobody listened is lost."""

    PING_EVERY = 30.0  # seconds between tests of the connection
    RETRY_MIN = 0.5
    RETRY_MAX = 10.0

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.wakers: list[Callable[[], None]] = []
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, wake: Callable[[], None]) -> None:
        self.wakers.append(wake)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="dbevents-postgres-listen")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _wake(self) -> None:
        for wake in list(self.wakers):
            try:
                wake()
            except Exception:  # one bad callback must not stop the others
                log.exception("wake callback failed")

    async def _run(self) -> None:
        backoff = Backoff(self.RETRY_MIN, self.RETRY_MAX)
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.loc.conninfo, autocommit=True)
            except psycopg.Error as exc:
                delay = backoff.next()
                log.warning("cannot connect to listen for new events; retrying",
                            store=self.loc.display, error=_short(exc), retry_in=delay)
                await asyncio.sleep(delay)
                continue
            try:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.loc.channel)))
                self.connected.set()
                backoff.reset()
                self._wake()  # whatever was enqueued while nobody listened
                while True:
                    async for _ in conn.notifies(timeout=self.PING_EVERY):
                        self._wake()
                    # A half-open TCP connection stays silent for ever: ask.
                    await conn.execute("SELECT 1")
            except psycopg.Error as exc:
                self.connected.clear()
                delay = backoff.next()
                log.warning("listen connection lost; reconnecting", store=self.loc.display,
                            error=_short(exc), retry_in=delay)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(delay)


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
