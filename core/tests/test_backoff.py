import random

import pytest
from dbevents.backoff import Backoff, scheduled


def test_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.tries == 5
    b.reset()
    assert (b.next(), b.tries) == (0.5, 1)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="first <= cap"):
        Backoff(2.0, 1.0)


def test_scheduled_grows_by_the_factor_with_spread_under_the_cap() -> None:
    rng = random.Random(3)
    for attempt, about in [(1, 1.0), (2, 10.0), (3, 60.0), (9, 60.0)]:
        waits = [scheduled(attempt, 1.0, 60.0, 10.0, rng) for _ in range(100)]
        assert all(0.75 * about <= w <= min(60.0, 1.25 * about) for w in waits)
        assert len(set(waits)) == 100
