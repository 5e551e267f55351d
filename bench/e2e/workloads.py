"""What the scenarios write into the databases, and the configs dbevents reads."""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING, Any

from pymysql.constants import CLIENT

from testsupport import pgbench

if TYPE_CHECKING:
    from testsupport.servers import MariaDBServer, PostgresServer

# Slots are per cluster: each database gets its own, named after it, so a run
# that died before dropping its database cannot block the next one.
PUBLICATION = "bench_pub"

PG_TABLE = """
CREATE TABLE items (
    id bigint PRIMARY KEY,
    sku text NOT NULL,
    qty integer NOT NULL,
    price numeric(10, 2) NOT NULL,
    note text,
    seq bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
)"""


def config(store: str, databases: str, url: str, **trigger: Any) -> str:
    """A dbevents.toml: one trigger on the bench table (or ``tables``), delivering
    to ``url``."""
    trigger.setdefault("tables", ["items"])
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in trigger.items())
    return (f'[eventing]\nstore = "{store}"\n\n{databases}\n'
            f'[[triggers]]\nname = "bench"\nurl = "{url}"\n{extra}')


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def pg_database(server: PostgresServer, db: str) -> str:
    return (f'[databases.app]\ntype = "postgres"\nurl = "{server.dsn(db)}"\n'
            f'slot = "{db}"\npublication = "{PUBLICATION}"\n')


def pg_prepare(server: PostgresServer, db: str, seed: int, tables: str = "items",
               ddl: str = PG_TABLE, full_identity: bool = False, create: bool = True) -> None:
    """A fresh database with the table, ``seed`` rows written before capture
    starts (targets for the updates and deletes), then the publication and the
    slot, in that order, so every later change is captured."""
    if create:
        server.create_database(db)
    with server.connect(db) as conn:
        if ddl:
            conn.execute(ddl)
        if full_identity:
            conn.execute("ALTER TABLE items REPLICA IDENTITY FULL")
        if seed:
            conn.execute(f"""INSERT INTO items (id, sku, qty, price, note)
                SELECT i, 'sku-' || i, i % 100, (i % 10000) / 100.0, 'seed'
                FROM generate_series(0, {seed - 1}) AS i""")
        conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {tables}")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (db,))


def pg_mix(server: PostgresServer, db: str, n: int) -> None:
    """``n`` single-row transactions, in a server-side loop so the client's round
    trips do not bound the rate: per ten, 5 inserts of new rows, 3 updates and 2
    deletes of seeded rows (pg_prepare with seed >= n); every change touches a
    different row."""
    with server.connect(db) as conn:
        conn.execute(f"""
            DO $$
            DECLARE
                ins bigint := {n};
                upd bigint := 0;
                del bigint := {n - 1};
            BEGIN
                FOR i IN 0 .. {n - 1} LOOP
                    IF i % 10 < 5 THEN
                        INSERT INTO items (id, sku, qty, price, note)
                        VALUES (ins, 'sku-' || ins, ins % 100, (ins % 10000) / 100.0, 'new');
                        ins := ins + 1;
                    ELSIF i % 10 < 8 THEN
                        UPDATE items SET qty = qty + 1, note = 'updated', updated_at = now()
                        WHERE id = upd;
                        upd := upd + 1;
                    ELSE
                        DELETE FROM items WHERE id = del;
                        del := del - 1;
                    END IF;
                    COMMIT;
                END LOOP;
            END $$""")


class LatencyWriter(threading.Thread):
    """Changes at a fixed rate, one transaction each (5 inserts, 3 updates, 2
    deletes per ten), recording for each the wall-clock time just before COMMIT
    is sent, under the key the receiver rebuilds from the event
    (type:docId:seq). The time is at most one loopback round trip before the
    commit, so latencies come out slightly high, never low."""

    def __init__(self, server: PostgresServer, db: str, rate: float, seconds: float,
                 first: int = 0) -> None:
        super().__init__(name="latency-writer", daemon=True)
        self.server, self.db, self.rate, self.seconds = server, db, rate, seconds
        self.first = first
        self.commits: dict[str, float] = {}
        self.late = 0  # changes written more than 5 ms behind the schedule
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        rng = random.Random(7)
        alive: list[tuple[int, int]] = []  # (id, seq) of rows this writer inserted
        with self.server.connect(self.db, autocommit=False) as conn:
            start = time.monotonic()
            for k in range(self.first, self.first + int(self.rate * self.seconds)):
                due = start + (k - self.first) / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -0.005:
                    self.late += 1
                kind = k % 10
                if kind < 5 or len(alive) < 10:
                    conn.execute("INSERT INTO items (id, sku, qty, price, note, seq) "
                                 "VALUES (%s, %s, 1, 9.99, 'new', %s)", (k, f"sku-{k}", k))
                    alive.append((k, k))
                    key = f"DB_INSERT:{k}:{k}"
                elif kind < 8:
                    i = rng.randrange(len(alive))
                    row = alive[i][0]
                    conn.execute("UPDATE items SET seq = %s, qty = qty + 1 WHERE id = %s",
                                 (k, row))
                    alive[i] = (row, k)
                    key = f"DB_UPDATE:{row}:{k}"
                else:
                    row, seq = alive.pop(0)
                    conn.execute("DELETE FROM items WHERE id = %s", (row,))
                    key = f"DB_DELETE:{row}:{seq}"
                self.commits[key] = time.time()
                conn.commit()


def my_database(server: MariaDBServer, db: str, start: str, server_id: int) -> str:
    return (f'[databases.app]\ntype = "mysql"\nurl = "{server.dsn(db)}"\n'
            f'start = "{start}"\nserver_id = {server_id}\n')


def my_prepare(server: MariaDBServer, db: str) -> str:
    """A fresh database with the table; returns the binlog position to start at."""
    server.create_database(db)
    server.execute("""CREATE TABLE items (
        id BIGINT PRIMARY KEY, sku VARCHAR(32) NOT NULL, qty INT NOT NULL,
        price DECIMAL(10, 2) NOT NULL, note VARCHAR(64), updated_at DATETIME(6) NOT NULL
    )""", db=db)
    row = server.execute("SHOW MASTER STATUS")[0]
    return f"{row[0]}:{row[1]}"


def my_inserts(server: MariaDBServer, db: str, n: int) -> None:
    """``n`` single-row INSERTs, each its own transaction (autocommit), sent 200
    statements per round trip."""
    conn = server.connect(db, client_flag=CLIENT.MULTI_STATEMENTS)
    try:
        with conn.cursor() as cur:
            for first in range(0, n, 200):
                cur.execute(";".join(
                    f"INSERT INTO items VALUES ({i}, 'sku-{i}', {i % 100}, "
                    f"{i % 10000 / 100:.2f}, 'new', NOW(6))"
                    for i in range(first, min(first + 200, n))))
                while cur.nextset():
                    pass
    finally:
        conn.close()


PGBENCH_TABLES = pgbench.TABLES


def pgbench_init(server: PostgresServer, db: str, scale: int) -> str:
    server.create_database(db)
    pgbench.init(server, db, scale)
    return db


def pgbench_run(server: PostgresServer, db: str, seconds: int, clients: int) -> dict[str, float]:
    """pgbench's built-in TPC-B-like script, no vacuum (testsupport.pgbench)."""
    result = pgbench.run(server, db, "-T", str(seconds), "-c", str(clients), "-j", str(clients))
    return {"transactions": result.transactions, "tps": result.tps}


def table_counters(server: PostgresServer, db: str) -> dict[str, tuple[int, int, int]]:
    """PostgreSQL's own per-table counters: (inserted, updated, deleted) rows."""
    rows = server.execute("SELECT relname, n_tup_ins, n_tup_upd, n_tup_del "
                          "FROM pg_stat_user_tables", dbname=db)
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}
