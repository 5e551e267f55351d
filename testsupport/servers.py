"""Private PostgreSQL and MariaDB servers for tests.

Each server lives in its own temp folder (data, socket, pid, log), listens on
127.0.0.1 on a free port, and is removed again on stop(). The system services on
5432/3306 are never touched. When run as root, files are owned by and processes run as
the distribution's service account ("postgres" / "mysql"), because both servers refuse
to run as root.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from testsupport.ports import free_port

if TYPE_CHECKING:
    import psycopg
    import pymysql.connections

SettingValue = str | int | float | bool | None
"""A server setting; None removes a default setting."""


class ServerError(RuntimeError):
    """A test server could not be found, initialised, started or stopped."""


class _Server:
    """Temp folder, child process, readiness wait and shutdown shared by both servers."""

    kind: ClassVar[str]
    run_as: ClassVar[str]  # service account used when running as root
    stop_signal: ClassVar[signal.Signals]

    def __init__(self, settings: Mapping[str, SettingValue] | None, ready_timeout: float) -> None:
        self.settings: dict[str, SettingValue] = dict(settings or {})
        self.ready_timeout = ready_timeout
        self.port = 0
        self.tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- to be provided by subclasses ------------------------------------------------
    def _initialise(self, tmpdir: Path) -> None:
        raise NotImplementedError

    def _server_argv(self) -> list[str]:
        raise NotImplementedError

    def _ping(self) -> None:
        """Raise unless the server accepts a client connection."""
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        if self.tmpdir is None:
            raise ServerError(f"{self.kind} server was never started")
        return self.tmpdir / "server.log"

    def start(self) -> _Server:
        """Initialise (first time only) and start the server; return self."""
        if self.running:
            return self
        if self.tmpdir is None:
            # A server that never came up is useless: clean it away; the error carries
            # the log tail.
            try:
                self._first_start()
            except BaseException:
                self.stop()
                raise
            return self
        self._launch()
        return self

    def _first_start(self) -> None:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"dbevents-{self.kind}-"))
        _live.add(self)
        account = self._account()
        if account is not None:
            os.chown(self.tmpdir, account.pw_uid, account.pw_gid)
        self._initialise(self.tmpdir)
        # The free port can be taken between picking and binding: pick again then.
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port()
            try:
                self._launch()
                return
            except ServerError as exc:
                if attempt == 2 or not _bind_failed(str(exc)):
                    raise

    def stop(self) -> None:
        """Shut the server down and remove its temp folder."""
        self._shutdown()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        _live.discard(self)

    def restart(self) -> None:
        """Shut down and start again on the same port with the same data."""
        self._shutdown()
        self._launch()

    def pause(self, seconds: float) -> None:
        """An outage: shut down, stay down for ``seconds``, start again (same port
        and data)."""
        self._shutdown()
        time.sleep(seconds)
        self._launch()

    def __enter__(self) -> _Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------------
    def _account(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError:
            raise ServerError(
                f"running as root needs the system user {self.run_as!r} to run {self.kind}"
            ) from None

    def _user_kwargs(self) -> dict[str, Any]:
        account = self._account()
        if account is None:
            return {}
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _run(self, argv: Sequence[str]) -> None:
        """Run a setup command as the service account, its output going to the log."""
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                check=False,
                **self._user_kwargs(),
            )
        if result.returncode != 0:
            raise ServerError(f"{argv[0]} exited with {result.returncode}\n{self.log_tail()}")

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._server_argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
                # Own session: a Ctrl-C in the terminal reaches pytest, whose fixture
                # teardown then stops the server cleanly.
                start_new_session=True,
                **self._user_kwargs(),
            )
        deadline = time.monotonic() + self.ready_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise ServerError(
                    f"{self.kind} exited with {code} during startup\n{self.log_tail()}"
                )
            try:
                self._ping()
                return
            except Exception as exc:  # any client error means "not ready yet"
                last_error = exc
                time.sleep(0.05)
        self._shutdown()
        raise ServerError(
            f"{self.kind} not ready within {self.ready_timeout}s on port {self.port}: "
            f"{last_error}\n{self.log_tail()}"
        )

    def _shutdown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, ServerError):
            return "(no server log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def _write_as_owner(self, path: Path, text: str) -> None:
        path.write_text(text)
        account = self._account()
        if account is not None:
            os.chown(path, account.pw_uid, account.pw_gid)


def _bind_failed(message: str) -> bool:
    return bool(re.search(r"could not bind|Address already in use|Can't start server", message))


def _check_own_server(row: tuple[Any, ...] | None, datadir: Path, port: int) -> None:
    # Whoever took a free port before our server could bind it would answer too.
    if row is None or Path(row[0]).resolve() != datadir.resolve():
        raise ServerError(f"another server answers on port {port}: data directory {row}")


_live: set[_Server] = set()


@atexit.register
def _stop_all() -> None:
    # Safety net for servers whose owner never called stop(), e.g. after a crash.
    for server in list(_live):
        server.stop()


def _find_binary(names: Sequence[str], dirs: Sequence[str]) -> str | None:
    for name in names:
        for directory in dirs:
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        found = shutil.which(name)
        if found:
            return found
    return None


# ---------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------


def find_postgres_bindir() -> Path:
    """The newest PostgreSQL server bin directory on this machine."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()]
    if candidates:
        return max(candidates, key=version)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(out.stdout.strip())
        if out.returncode == 0 and (bindir / "initdb").is_file():
            return bindir
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ServerError(
        "PostgreSQL server binaries (initdb, postgres) not found: install the "
        "postgresql package, or pass bindir= to PostgresServer"
    )


def _pg_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


class PostgresServer(_Server):
    """A private PostgreSQL cluster with logical decoding enabled.

    ``settings`` are written to postgresql.conf over the defaults below, e.g.
    ``PostgresServer({"wal_level": "replica"})`` for error-path tests; a value of None
    drops a default.
    """

    kind = "postgres"
    run_as = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: abort sessions, no waiting

    def __init__(
        self,
        settings: Mapping[str, SettingValue] | None = None,
        *,
        bindir: str | Path | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        super().__init__(settings, ready_timeout)
        self.bindir = Path(bindir) if bindir else find_postgres_bindir()
        for name in ("initdb", "postgres"):
            if not (self.bindir / name).is_file():
                raise ServerError(f"{self.bindir / name} not found")

    def start(self) -> PostgresServer:
        super().start()
        return self

    def __enter__(self) -> PostgresServer:
        return self.start()

    @property
    def datadir(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "data"

    def _initialise(self, tmpdir: Path) -> None:
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                # Durability of a throwaway cluster does not matter; speed does.
                "--no-sync",
                "--no-instructions",
            ]
        )
        settings: dict[str, SettingValue] = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(tmpdir),
            "wal_level": "logical",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "fsync": False,
            "full_page_writes": False,
            "max_connections": 200,
            **self.settings,
        }
        conf = self.datadir / "postgresql.conf"
        lines = [f"{k} = {_pg_value(v)}" for k, v in settings.items() if v is not None]
        with conf.open("a") as f:
            f.write("\n# testsupport\n" + "\n".join(lines) + "\n")
        self._write_as_owner(
            self.datadir / "pg_hba.conf",
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "local replication all trust\n"
            "host replication all 127.0.0.1/32 trust\n",
        )

    def _server_argv(self) -> list[str]:
        # The port is given here, not in the config, so restart() can keep it.
        return [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port)]

    def _ping(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        _check_own_server(row, self.datadir, self.port)

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit psycopg connection; kwargs go to psycopg.connect."""
        import psycopg

        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn(dbname), **kwargs)

    def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; return its rows (empty if none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> str:
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def create_password_user(self, name: str, password: str) -> str:
        """A superuser that must give its password over TCP (every other user is
        trusted): for tests of wrong passwords and of what error texts show."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER REPLICATION PASSWORD {}")
                         .format(sql.Identifier(name), sql.Literal(password)))
        hba = self.datadir / "pg_hba.conf"
        # The first matching line wins: these go before the trust lines.
        lines = (f"host all {name} 127.0.0.1/32 scram-sha-256\n"
                 f"host replication {name} 127.0.0.1/32 scram-sha-256\n")
        self._write_as_owner(hba, lines + hba.read_text())
        self.execute("SELECT pg_reload_conf()")
        import psycopg

        # The postmaster rereads pg_hba.conf after the call returns: wait for it.
        for _ in range(100):
            try:
                psycopg.connect(f"postgresql://{name}:not-it@127.0.0.1:{self.port}/postgres",
                                connect_timeout=2).close()
            except psycopg.OperationalError:
                return name
            time.sleep(0.05)
        raise ServerError("pg_hba.conf was not reloaded")

    def drop_database(self, name: str) -> None:
        """Drop a database with its replication slots, ending any sessions on it."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE database = %s AND active_pid IS NOT NULL",
                (name,),
            )
            # A terminated walsender releases its slot a moment later.
            deadline = time.monotonic() + 5
            while True:
                rows = conn.execute(
                    "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s",
                    (name,),
                ).fetchall()
                for slot, active in rows:
                    if not active:
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                if not any(active for _, active in rows) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# ---------------------------------------------------------------------------------
# MariaDB
# ---------------------------------------------------------------------------------


def _my_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "ON" if value else "OFF"
    return str(value)


class MariaDBServer(_Server):
    """A private MariaDB server writing a full row-based binlog.

    ``settings`` are mariadbd options over the defaults below (underscored names as in
    ``SHOW VARIABLES``), e.g. ``MariaDBServer({"binlog_format": "STATEMENT"})``; a value
    of None drops a default (``{"log_bin": None}`` turns the binlog off).
    """

    kind = "mariadb"
    run_as = "mysql"
    stop_signal = signal.SIGTERM  # clean shutdown

    def __init__(
        self,
        settings: Mapping[str, SettingValue] | None = None,
        *,
        ready_timeout: float = 30.0,
    ) -> None:
        super().__init__(settings, ready_timeout)
        sbin = ["/usr/sbin", "/usr/libexec", "/usr/bin"]
        mariadbd = _find_binary(["mariadbd", "mysqld"], sbin)
        install_db = _find_binary(["mariadb-install-db", "mysql_install_db"], sbin)
        if mariadbd is None or install_db is None:
            raise ServerError(
                "MariaDB server binaries (mariadbd, mariadb-install-db) not found: "
                "install the mariadb-server package"
            )
        self.mariadbd = mariadbd
        self.install_db = install_db

    def start(self) -> MariaDBServer:
        super().start()
        return self

    def __enter__(self) -> MariaDBServer:
        return self.start()

    @property
    def datadir(self) -> Path:
        assert self.tmpdir is not None
        return self.tmpdir / "data"

    def _initialise(self, tmpdir: Path) -> None:
        self._run(
            [
                # --no-defaults first: the system service's my.cnf must not leak in.
                self.install_db,
                "--no-defaults",
                f"--datadir={self.datadir}",
                # root@127.0.0.1 with an empty password, so tests connect over TCP.
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                "--innodb-log-file-size=16M",
            ]
        )

    def _server_argv(self) -> list[str]:
        assert self.tmpdir is not None
        options: dict[str, SettingValue] = {
            "datadir": str(self.datadir),
            "tmpdir": str(self.tmpdir),
            "port": self.port,
            "bind_address": "127.0.0.1",
            "socket": str(self.tmpdir / "mysqld.sock"),
            "pid_file": str(self.tmpdir / "mysqld.pid"),
            "skip_name_resolve": True,
            "log_bin": str(self.tmpdir / "binlog"),
            "server_id": 1,
            "binlog_format": "ROW",
            "binlog_row_image": "FULL",
            "binlog_row_metadata": "FULL",
            "character_set_server": "utf8mb4",
            "collation_server": "utf8mb4_general_ci",
            "innodb_buffer_pool_size": "32M",
            "innodb_log_file_size": "16M",
            # Durability of a throwaway server does not matter; speed does.
            "innodb_flush_log_at_trx_commit": 2,
            "innodb_doublewrite": False,
            "sync_binlog": 0,
            **self.settings,
        }
        options["port"] = self.port  # the port is chosen here, never by settings
        args = [f"--{k}={_my_value(v)}" for k, v in options.items() if v is not None]
        # Without --log-error mariadbd logs to stderr, which goes to server.log.
        return [self.mariadbd, "--no-defaults", *args]

    def _ping(self) -> None:
        # read_timeout too: a listener that never greets must not hang the wait.
        conn = self.connect(connect_timeout=1, read_timeout=1, write_timeout=1)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT @@datadir")
                row = cur.fetchone()
        finally:
            conn.close()
        _check_own_server(row, self.datadir, self.port)

    def dsn(self, db: str = "") -> str:
        return f"mysql://root:@127.0.0.1:{self.port}/{db}"

    def connect(self, db: str | None = None, **kwargs: Any) -> pymysql.connections.Connection[Any]:
        """An autocommit PyMySQL connection as root; kwargs go to pymysql.connect."""
        import pymysql

        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("charset", "utf8mb4")
        return pymysql.connect(
            host="127.0.0.1", port=self.port, user="root", password="", database=db, **kwargs
        )

    def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        db: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; return its rows (empty if none)."""
        conn = self.connect(db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        self.execute(f"CREATE DATABASE {_my_ident(name)}")
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {_my_ident(name)}")


def _my_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"
