"""`TokenBuckets`: a burst, then a steady rate, per key; memory bounded."""

from __future__ import annotations

import pytest

from meshid.ratelimit import TokenBuckets


def test_a_burst_then_one_token_per_refill_interval() -> None:
    buckets = TokenBuckets(capacity=3, period=30.0)  # 3 tokens, refilled 3 per 30 s
    assert [buckets.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 0.0) == pytest.approx(10.0)  # one token comes back every 10 s
    assert buckets.take("a", 4.0) == pytest.approx(6.0)  # a refused try costs nothing
    assert buckets.take("a", 10.0) == 0.0
    assert buckets.take("a", 10.0) == pytest.approx(10.0)
    assert buckets.take("b", 10.0) == 0.0  # each key has a bucket of its own


def test_a_bucket_refills_to_its_capacity_and_no_further() -> None:
    buckets = TokenBuckets(capacity=2, period=20.0)
    assert buckets.take("a", 0.0) == 0.0
    assert [buckets.take("a", 1000.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(10.0)]


def test_the_keys_held_are_bounded_and_the_oldest_goes_first() -> None:
    buckets = TokenBuckets(capacity=1, period=60.0, max_keys=3)
    for n, key in enumerate("abc"):
        assert buckets.take(key, float(n)) == 0.0
    assert buckets.take("a", 5.0) > 0  # "a" used again: now the newest
    assert buckets.take("d", 6.0) == 0.0  # full: "b", touched longest ago, is forgotten
    assert len(buckets._buckets) == 3
    assert buckets.take("a", 7.0) > 0  # still remembered
    assert buckets.take("b", 8.0) == 0.0  # forgotten: a full bucket again
    # buckets that have refilled are dropped before any that is still short
    assert buckets.take("e", 1000.0) == 0.0
    assert sorted(buckets._buckets) == ["e"]
