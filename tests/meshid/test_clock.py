from datetime import UTC, datetime, timedelta

import pytest

from meshid.clock import Clock, ManualClock


def test_system_clock_is_utc_aware_and_monotonic() -> None:
    clock = Clock()
    assert clock.wall().tzinfo is not None
    assert clock.wall().utcoffset() == timedelta(0)
    first = clock.monotonic()
    assert clock.monotonic() >= first


def test_manual_clock_moves_only_when_told() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    clock = ManualClock(start, monotonic=5.0)
    assert (clock.wall(), clock.monotonic()) == (start, 5.0)
    clock.advance(90)
    assert clock.wall() == start + timedelta(seconds=90)
    assert clock.monotonic() == 95.0
    clock.set_wall(start)
    assert (clock.wall(), clock.monotonic()) == (start, 95.0)
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        ManualClock(datetime(2030, 1, 1))  # a naive time is refused
    assert isinstance(clock, Clock)
