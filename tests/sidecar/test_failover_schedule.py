"""The choice of authority server and its backoff (pure): an injected clock and a seeded random."""

from __future__ import annotations

import random

import pytest

from sidecar.failover import FAILOVER_BASE, FAILOVER_CAP, MAX_SERVERS, Backoff, ServerChoice


def test_the_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=30.0)
    assert [backoff.ceiling(n) for n in range(0, 8)] == [0.0, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.ceiling(10_000) == 30.0  # no overflow, however long the outage


def test_full_jitter_spreads_delays_over_the_whole_window() -> None:
    rand = random.Random(20261207)
    backoff = Backoff(base=1.0, cap=30.0)
    for failures, ceiling in ((1, 1.0), (3, 4.0), (9, 30.0)):
        delays = [backoff.delay(failures, rand.random()) for _ in range(2000)]
        assert all(0.0 <= d < ceiling for d in delays)
        # Full jitter, not "half the window plus jitter": some go almost at once, some
        # wait almost the whole window, and each tenth of it gets its share.
        assert min(delays) < 0.01 * ceiling and max(delays) > 0.99 * ceiling
        tenths = [0] * 10
        for d in delays:
            tenths[int(d / ceiling * 10)] += 1
        assert all(150 <= n <= 250 for n in tenths), tenths


def test_a_fleet_that_loses_one_server_does_not_arrive_at_the_next_in_one_instant() -> None:
    rand = random.Random(7)
    arrivals = []
    for _ in range(500):  # 500 sidecars, each with its own choice, all failing at t=100
        choice = ServerChoice(2)
        move = choice.failed(0, 100.0, rand.random())
        assert move is not None and move.to == 1
        arrivals.append(100.0 + choice.wait(100.0))
    per_tenth_of_a_second: dict[int, int] = {}
    for at in arrivals:
        slot = int((at - 100.0) * 10)
        per_tenth_of_a_second[slot] = per_tenth_of_a_second.get(slot, 0) + 1
    assert max(arrivals) - min(arrivals) > 0.9 * FAILOVER_BASE
    assert max(per_tenth_of_a_second.values()) < 500 * 0.1, per_tenth_of_a_second
    in_one_second = max(sum(1 for at in arrivals if t <= at < t + 1) for t in arrivals)
    assert in_one_second < 500 * 0.6  # not every sidecar in the same second


def test_failures_move_round_robin_with_a_growing_gate() -> None:
    choice = ServerChoice(3, Backoff(base=1.0, cap=4.0))
    now = 50.0
    assert choice.index == 0 and choice.wait(now) == 0.0
    seen = []
    for failures, (expected_to, ceiling) in enumerate(((1, 1.0), (2, 2.0), (0, 4.0), (1, 4.0)), 1):
        move = choice.failed(choice.index, now, 0.5)
        assert move is not None
        assert (move.to, move.delay, move.failures) == (expected_to, ceiling / 2, failures)
        assert choice.wait(now) == ceiling / 2
        assert choice.wait(now + ceiling / 4) == ceiling / 4  # the clock moves the gate closer
        assert choice.wait(now + ceiling) == 0.0
        seen.append(move.left)
        now += ceiling
    assert seen == [0, 1, 2, 0]


def test_a_success_sticks_to_the_server_and_resets_the_backoff() -> None:
    choice = ServerChoice(2, Backoff(base=1.0, cap=30.0))
    for _ in range(5):
        choice.failed(choice.index, 0.0, 0.999)
    assert choice.failures == 5 and choice.index == 1
    choice.succeeded(1)
    assert choice.index == 1  # it stays where it works, not back to the first
    assert choice.failures == 0 and choice.wait(0.0) == 0.0
    move = choice.failed(1, 10.0, 0.999)
    assert move is not None and move.to == 0
    assert move.delay == pytest.approx(0.999)  # the first failure again: up to the base
    choice.succeeded(1)  # a late answer from the server it left moves nothing back
    assert choice.index == 0 and choice.failures == 1


def test_a_failure_of_a_server_already_left_moves_nothing() -> None:
    choice = ServerChoice(2)
    first = choice.failed(0, 0.0, 0.5)
    assert first is not None
    gate = choice.wait(0.0)
    assert choice.failed(0, 0.1, 0.9) is None  # a request in flight when another moved on
    assert choice.index == 1 and choice.failures == 1 and choice.wait(0.0) == gate


def test_a_single_server_never_moves_and_never_waits() -> None:
    choice = ServerChoice(1)
    for _ in range(10):
        assert choice.failed(0, 0.0, 0.9) is None
    assert choice.index == 0 and choice.wait(0.0) == 0.0


@pytest.mark.parametrize("count", [0, MAX_SERVERS + 1])
def test_the_count_is_bounded(count: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 16"):
        ServerChoice(count)


def test_the_defaults_are_the_documented_ones() -> None:
    assert (MAX_SERVERS, FAILOVER_BASE, FAILOVER_CAP) == (16, 2.0, 30.0)
    assert Backoff().ceiling(1) == FAILOVER_BASE and Backoff().ceiling(99) == FAILOVER_CAP
