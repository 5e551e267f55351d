import socket
import time
import uuid

import psycopg
import pytest

from testsupport.servers import MariaDBServer, PostgresServer, ServerError


def test_postgres_is_ready_for_logical_replication(
    postgres_server: PostgresServer, pg_database: str
) -> None:
    settings = dict(
        postgres_server.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            (["wal_level", "max_wal_senders", "max_replication_slots", "listen_addresses"],),
        )
    )
    assert settings == {
        "wal_level": "logical",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "listen_addresses": "127.0.0.1",
    }
    assert postgres_server.port not in (0, 5432)

    with psycopg.connect(
        postgres_server.dsn(pg_database), replication="database", autocommit=True
    ) as conn:
        systemid, timeline, _xlogpos, dbname = conn.execute("IDENTIFY_SYSTEM").fetchone()  # type: ignore[misc]
    assert systemid and timeline == 1 and dbname == pg_database

    # Changes in the fresh database decode through a logical slot.
    db = pg_database
    postgres_server.execute(
        "SELECT pg_create_logical_replication_slot('s1', 'test_decoding')", dbname=db
    )
    postgres_server.execute("CREATE TABLE t (id int PRIMARY KEY, v text)", dbname=db)
    postgres_server.execute("INSERT INTO t VALUES (1, 'a')", dbname=db)
    changes = postgres_server.execute(
        "SELECT data FROM pg_logical_slot_get_changes('s1', NULL, NULL)", dbname=db
    )
    assert any("INSERT" in row[0] and "'a'" in row[0] for row in changes)


def test_pg_database_is_fresh_and_drop_removes_its_slots(
    postgres_server: PostgresServer, pg_database: str
) -> None:
    assert postgres_server.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", dbname=pg_database
    ) == [(0,)]
    # Unique names: the session's server is shared with every other test.
    suffix = uuid.uuid4().hex[:8]
    other = postgres_server.create_database(f"drop_me_{suffix}")
    postgres_server.execute(
        "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"s_drop_{suffix}",),
        dbname=other,
    )
    assert postgres_server.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE database = %s", (other,)
    ) == [(1,)]
    postgres_server.drop_database(other)
    assert postgres_server.execute(
        "SELECT count(*) FROM pg_database WHERE datname = %s", (other,)
    ) == [(0,)]
    assert postgres_server.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE database = %s OR slot_name = %s",
        (other, f"s_drop_{suffix}"),
    ) == [(0,)]


def test_postgres_settings_port_retry_restart_and_stop() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    server = PostgresServer({"wal_level": "replica"})
    server.port = busy.getsockname()[1]  # force a bind failure on the first try
    try:
        server.start()
        assert server.port != busy.getsockname()[1]
        assert server.execute("SHOW wal_level") == [("replica",)]
        with pytest.raises(psycopg.Error, match="wal_level"):
            server.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")

        server.execute("CREATE TABLE kept (x int)")
        port = server.port
        server.restart()
        assert server.port == port
        assert server.execute("SELECT count(*) FROM kept") == [(0,)]
        tmpdir = server.tmpdir
    finally:
        server.stop()
        busy.close()
    assert tmpdir is not None and not tmpdir.exists()
    assert not server.running


def test_postgres_startup_failure_shows_the_log() -> None:
    server = PostgresServer({"shared_buffers": "lots"}, ready_timeout=10)
    with pytest.raises(ServerError, match=r"(?s)exited with.*shared_buffers"):
        server.start()
    assert server.tmpdir is None  # cleaned away after a failed first start


def test_missing_binaries_are_an_error_not_a_skip() -> None:
    with pytest.raises(ServerError, match="not found"):
        PostgresServer(bindir="/nonexistent")


def test_mariadb_writes_a_full_row_binlog(
    mariadb_server: MariaDBServer, mariadb_database: str
) -> None:
    variables = dict(
        mariadb_server.execute(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN "
            "('log_bin', 'binlog_format', 'binlog_row_image', 'binlog_row_metadata',"
            " 'server_id', 'bind_address')"
        )
    )
    assert variables == {
        "log_bin": "ON",
        "binlog_format": "ROW",
        "binlog_row_image": "FULL",
        "binlog_row_metadata": "FULL",
        "server_id": "1",
        "bind_address": "127.0.0.1",
    }
    assert mariadb_server.port not in (0, 3306)
    assert mariadb_server.dsn("x") == f"mysql://root:@127.0.0.1:{mariadb_server.port}/x"

    db = mariadb_database
    log_file, log_pos = mariadb_server.execute("SHOW MASTER STATUS")[0][:2]
    mariadb_server.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10))", db=db)
    mariadb_server.execute("INSERT INTO t VALUES (1, 'a')", db=db)
    events = mariadb_server.execute(f"SHOW BINLOG EVENTS IN '{log_file}' FROM {log_pos}")
    assert "Write_rows_v1" in [event[2] for event in events]


def test_mariadb_settings_port_retry_and_restart() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    server = MariaDBServer({"binlog_format": "STATEMENT"})
    server.port = busy.getsockname()[1]  # force a bind failure on the first try
    with busy, server:
        assert server.port != busy.getsockname()[1]
        assert server.execute("SELECT @@GLOBAL.binlog_format") == [("STATEMENT",)]
        server.create_database("kept")
        port = server.port
        clean_before = _clean_shutdowns(server)
        started = time.monotonic()
        server.restart()
        # A clean shutdown (SIGTERM honoured), not the kill after the 30 s wait.
        assert _clean_shutdowns(server) == clean_before + 1, server.log_tail()
        assert time.monotonic() - started < 60
        assert server.port == port
        assert ("kept",) in server.execute("SHOW DATABASES")


def _clean_shutdowns(server: MariaDBServer) -> int:
    """How many times the server logged the end of a clean shutdown."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    return sum(line.endswith(": Shutdown complete") for line in lines)
