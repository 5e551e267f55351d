"""`dbevents demo`: an embedded PostgreSQL, the SQLite eventing DB, a local
webhook receiver, and `dbevents run` as a separate process, all in one folder."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import click
from dbevents.hints import command

from dbevents_demo import embedded, workload
from dbevents_demo.receiver import BROKEN_PATH, OK_PATH, DemoReceiver

BROKEN_RETRIES = 2

CONFIG = """\
# Written by `dbevents demo` on every start; edit a copy, not this file.
[eventing]
store = "sqlite:///dbevents.db"

[databases.demo]
type = "postgres"
url = "{uri}"

[[triggers]]
name = "users-to-receiver"
databases = ["demo"]
tables = ["users"]
url = "{ok_url}"

[[triggers]]
name = "deletes-to-broken-hook"
tables = ["users"]
operations = ["delete"]
url = "{broken_url}"
retries = {retries}
backoff_base = 500
backoff_max = 2000
# This receiver fails every event on purpose, to show retries and failed events;
# a real one failing everything would pause the trigger (docs/delivery.md).
pause_after = 0
"""


def default_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dbevents" / "demo"


@click.command()
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Data folder (default: $XDG_STATE_HOME/dbevents/demo).")
@click.option("--every", type=float, default=2.0, show_default=True,
              help="Seconds between the demo's changes.")
@click.option("--duration", type=float, default=None,
              help="Stop by itself after this many seconds (default: run until Ctrl-C).")
def demo(folder: Path | None, every: float, duration: float | None) -> None:
    """Watch database changes become webhooks: an embedded PostgreSQL, a local
    receiver, and a few inserts, updates and deletes on a timer. Ctrl-C stops;
    running it again resumes where it left off."""
    folder = (folder or default_dir()).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    code = asyncio.run(_main(folder, every, duration))
    sys.exit(code)


async def _main(folder: Path, every: float, duration: float | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    click.echo(f"data folder: {folder}")
    click.echo("starting the embedded PostgreSQL (first run: about a minute)...")
    server = await asyncio.to_thread(embedded.start, folder / "pgdata")
    receiver = DemoReceiver(broken_attempts=1 + BROKEN_RETRIES)
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.Task[None] | None = None
    try:
        uri = embedded.uri(server)
        await workload.prepare(uri)
        await receiver.start()
        config = folder / "dbevents.toml"
        config.write_text(CONFIG.format(uri=uri, ok_url=receiver.url(OK_PATH),
                                        broken_url=receiver.url(BROKEN_PATH),
                                        retries=BROKEN_RETRIES))
        log_path = folder / "dbevents.log"
        click.echo(f"config: {config}")
        click.echo(f"dbevents log: {log_path}")
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dbevents.cli", "--config", str(config),
                "--log-format", "json", "run", stdout=log, stderr=log,
                # Its own session: a terminal's Ctrl-C goes to the whole foreground
                # process group, and the child must get only the one SIGTERM sent
                # below, or it takes the second signal as "exit now" and never drains.
                start_new_session=True)
        click.echo(f"dbevents run started (pid {proc.pid}); changing the users table every "
                   f"{every:g} s. Ctrl-C to stop.\n")
        writer = asyncio.create_task(workload.run(uri, every))
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(proc.wait()), writer]
        done, _ = await asyncio.wait(waits, timeout=duration,
                                     return_when=asyncio.FIRST_COMPLETED)
        for w in waits[:2]:
            w.cancel()
        if proc.returncode is not None:
            click.secho(f"dbevents run exited with code {proc.returncode}; the end of "
                        f"{log_path}:", fg="red", err=True)
            click.echo(_tail(log_path), err=True)
            return 1
        if writer in done and writer.exception() is not None:
            raise writer.exception()  # type: ignore[misc]
        return 0
    finally:
        click.echo("\nstopping...")
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await receiver.stop()
        await asyncio.to_thread(embedded.stop, server)
        click.echo("stopped. Run the same command again to resume; look at the event log with:")
        config_file = folder / "dbevents.toml"
        click.echo(f"  {command(f'events list --config {config_file}')}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
