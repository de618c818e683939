"""`TokenBucket`: a burst, then a steady rate; a key never seen holds a full bucket."""

from __future__ import annotations

import pytest

from meshid.ratelimit import TokenBucket


def _take(bucket: TokenBucket, held: tuple[float, float] | None, now: float) -> tuple[float, float]:
    """Spend one token if there is one: what to keep, and the wait (0 when spent)."""
    tokens = bucket.level(held, now)
    wait = bucket.wait(tokens)
    return (tokens if wait else tokens - 1.0, now), wait


def test_a_burst_then_one_token_per_refill_interval() -> None:
    bucket = TokenBucket(capacity=3, period=30.0)  # 3 tokens, refilled 3 per 30 s
    held = None
    waits = []
    for _ in range(4):
        held, wait = _take(bucket, held, 0.0)
        waits.append(wait)
    assert waits == [0.0, 0.0, 0.0, pytest.approx(10.0)]  # one token back every 10 s
    assert _take(bucket, held, 4.0)[1] == pytest.approx(6.0)  # a refused try costs nothing
    held, wait = _take(bucket, held, 10.0)
    assert wait == 0.0
    assert _take(bucket, held, 10.0)[1] == pytest.approx(10.0)


def test_a_bucket_refills_to_its_capacity_and_no_further() -> None:
    bucket = TokenBucket(capacity=2, period=20.0)
    assert bucket.level(None, 0.0) == 2.0
    assert bucket.level((0.0, 0.0), 5.0) == pytest.approx(0.5)
    assert bucket.level((1.0, 0.0), 1000.0) == 2.0
    assert bucket.level((1.0, 50.0), 10.0) == 1.0  # a clock set back refills nothing
    assert bucket.wait(2.0) == 0.0 and bucket.wait(0.5) == pytest.approx(5.0)
