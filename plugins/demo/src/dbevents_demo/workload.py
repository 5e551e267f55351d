"""The demo's table and the changes made to it on a timer."""

from __future__ import annotations

import asyncio
import itertools
import random

import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id         serial PRIMARY KEY,
    name       text NOT NULL,
    email      text NOT NULL,
    plan       text NOT NULL DEFAULT 'free',
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
FULL_IDENTITY = "ALTER TABLE users REPLICA IDENTITY FULL"  # deletes carry the whole row

NAMES = ["ada", "grace", "linus", "barbara", "ken", "margaret", "dennis", "frances",
         "edsger", "radia", "donald", "leslie"]
PLANS = ["free", "pro", "team"]


async def prepare(uri: str) -> None:
    async with await psycopg.AsyncConnection.connect(uri, autocommit=True) as conn:
        await conn.execute(SCHEMA)
        await conn.execute(FULL_IDENTITY)


async def run(uri: str, every: float) -> None:
    """Insert, update, delete in turn, for ever (cancel to stop)."""
    rng = random.Random()
    async with await psycopg.AsyncConnection.connect(uri, autocommit=True) as conn:
        for step in itertools.count():
            kind = ("insert", "update", "insert", "update", "delete")[step % 5]
            if kind == "insert":
                name = rng.choice(NAMES)
                await conn.execute(
                    "INSERT INTO users (name, email) VALUES (%s, %s)",
                    (name, f"{name}.{rng.randrange(1000)}@example.com"))
            elif kind == "update":
                await conn.execute(
                    "UPDATE users SET plan = %s, updated_at = now() "
                    "WHERE id = (SELECT max(id) FROM users)", (rng.choice(PLANS),))
            else:
                await conn.execute("DELETE FROM users WHERE id = (SELECT min(id) FROM users)")
            await asyncio.sleep(every)
