"""Waiting before trying again: the one backoff rule every part of dbevents uses.

Reconnect loops (sources, stores, the engine's and dispatcher's store writes,
a paused trigger's probes) double a delay up to a cap and start again from the
first delay once a try succeeds. Delivery retries follow a growing schedule with
jitter (``scheduled``), so many events failed by one outage do not all come back
at the same instant.
"""

from __future__ import annotations

import asyncio
import random

_rng = random.Random()


class Backoff:
    """A doubling delay: ``first``, 2 x ``first``, ... up to ``cap`` seconds."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        if first <= 0 or cap < first:
            raise ValueError(f"need 0 < first <= cap, got {first} and {cap}")
        self.first = first
        self.cap = cap
        self._delay = first
        self.tries = 0  # waits since the last reset

    def next(self) -> float:
        """The wait before the next try; the one after it is twice as long (capped)."""
        delay = self._delay
        self._delay = min(self._delay * 2, self.cap)
        self.tries += 1
        return delay

    def reset(self) -> None:
        """A try succeeded: the next failure waits ``first`` again."""
        self._delay = self.first
        self.tries = 0

    async def sleep(self) -> float:
        """Wait ``next()`` seconds; returns how long that was."""
        delay = self.next()
        await asyncio.sleep(delay)
        return delay


def scheduled(attempt: int, base: float, cap: float, factor: float,
              rng: random.Random | None = None, spread: float = 0.25) -> float:
    """The wait after failed attempt number ``attempt`` (1-based) on a growing
    schedule: about min(cap, base x factor^(attempt-1)), give or take ``spread``
    (so events failed together do not all come back at one instant), never
    above ``cap``. With base 1, factor 10, cap 60: about 1, 10, 60, 60 ..."""
    delay = min(cap, base * factor ** max(0, attempt - 1))
    high = min(cap, delay * (1 + spread))  # at the cap, spread below it only
    return (rng or _rng).uniform(min(delay * (1 - spread), high), high)
