"""The outbound session cache: each session offered once, newest first, bounded every way."""

from __future__ import annotations

from sidecar.sessions import SessionCache


def test_a_session_is_taken_once_newest_first() -> None:
    cache: SessionCache[str] = SessionCache(max_age=300)
    cache.put("a:1", "old", 0)
    cache.put("a:1", "new", 1)
    assert cache.take("a:1", 2) == "new"
    assert cache.take("a:1", 2) == "old"
    assert cache.take("a:1", 2) is None
    assert len(cache) == 0


def test_sessions_are_per_upstream() -> None:
    cache: SessionCache[str] = SessionCache(max_age=300)
    cache.put("a:1", "for a", 0)
    assert cache.take("b:1", 0) is None
    assert cache.take("a:1", 0) == "for a"


def test_a_session_too_old_is_never_offered() -> None:
    cache: SessionCache[str] = SessionCache(max_age=300)
    cache.put("a:1", "older", 0)
    cache.put("a:1", "old", 10)
    assert cache.take("a:1", 309) == "old"
    assert cache.take("a:1", 309) is None  # "older" aged out
    cache.put("a:1", "x", 0)
    cache.put("a:1", "y", 1)
    assert cache.take("a:1", 400) is None
    assert len(cache) == 0


def test_each_upstream_keeps_its_newest_few() -> None:
    cache: SessionCache[int] = SessionCache(max_age=300, per_upstream=3)
    for n in range(5):
        cache.put("a:1", n, n)
    assert len(cache) == 3
    assert [cache.take("a:1", 5) for _ in range(4)] == [4, 3, 2, None]


def test_the_total_evicts_from_the_upstream_put_to_longest_ago() -> None:
    cache: SessionCache[str] = SessionCache(max_age=300, per_upstream=10, total=4)
    cache.put("a:1", "a0", 0)
    cache.put("a:1", "a1", 1)
    cache.put("b:1", "b0", 2)
    cache.put("b:1", "b1", 3)
    cache.put("c:1", "c0", 4)  # a:1 was put to longest ago: it loses its oldest
    assert len(cache) == 4
    assert cache.take("a:1", 5) == "a1"
    assert cache.take("a:1", 5) is None
    cache.put("c:1", "c1", 6)
    cache.put("c:1", "c2", 7)
    cache.put("c:1", "c3", 8)  # b:1 is oldest now and gives up both
    assert len(cache) == 4
    assert cache.take("b:1", 9) is None
    assert [cache.take("c:1", 9) for _ in range(5)] == ["c3", "c2", "c1", "c0", None]


def test_a_cache_of_size_zero_keeps_nothing() -> None:
    cache: SessionCache[str] = SessionCache(max_age=300, total=0)
    cache.put("a:1", "s", 0)
    assert cache.take("a:1", 0) is None
