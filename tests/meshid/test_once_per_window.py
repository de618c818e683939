"""`OncePerWindow`: one event per key per window recorded, the rest counted, memory bounded."""

from __future__ import annotations

from meshid.ratelimit import OncePerWindow


def test_one_event_per_key_per_window_and_the_count_of_those_left_out() -> None:
    sampler = OncePerWindow(window=60.0)
    assert sampler.admit("a", 0.0) == 0
    assert [sampler.admit("a", t) for t in (1.0, 30.0, 59.9)] == [None, None, None]
    assert sampler.admit("b", 10.0) == 0  # each key on its own
    assert sampler.admit("a", 60.0) == 3  # a window later: recorded, with the three left out
    assert sampler.admit("a", 61.0) is None
    assert sampler.admit("a", 200.0) == 1


def test_the_keys_held_are_bounded_and_the_oldest_goes_first() -> None:
    sampler = OncePerWindow(window=60.0, max_keys=3)
    for n, key in enumerate("abc"):
        assert sampler.admit(key, float(n)) == 0
    assert sampler.admit("a", 5.0) is None
    assert sampler.admit("d", 6.0) == 0  # full of keys in their window: "a" is forgotten
    assert len(sampler._seen) == 3
    assert sampler.admit("a", 7.0) == 0  # recorded again (its count was lost)
    assert sampler.admit("b", 8.0) == 0  # "a" coming back made room by forgetting "b"
    # keys whose window has passed are dropped before any live one
    assert sampler.admit("e", 100.0) == 0
    assert sorted(sampler._seen) == ["e"]
