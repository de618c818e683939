"""The renewal schedule (pure) and the renewal loop, on trio's autojump clock.

Virtual time moves only when every task waits, so a test can cover minutes
of renewals in milliseconds, and exact instants can be asserted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import trio
import trio.testing

from meshid.errors import MeshIdError
from sidecar.control import ControlPlaneError
from sidecar.renewal import WATCH_RETRY_MAX, Pacing, renewal_loop
from sidecar.schedule import EXPIRED, EXPIRING, OK, Schedule

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SKEW = timedelta(seconds=30)


def cert_times(issued: datetime, ttl: float) -> tuple[datetime, datetime]:
    return issued - SKEW, issued + timedelta(seconds=ttl)


# -- the pure schedule --


@pytest.mark.parametrize(
    ("ttl", "rand", "expected"),
    [(30, 0.5, 15.0), (30, 0.0, 12.0), (30, 0.999999, 18.0), (3600, 0.5, 1800.0)],
)
def test_renew_at_half_life_with_ten_percent_jitter(ttl: int, rand: float, expected: float) -> None:
    nb, na = cert_times(T0, ttl)
    assert Schedule().renew_delay(nb, na, T0, rand) == pytest.approx(expected, abs=1e-3)


def test_renew_delay_counts_from_now_and_never_goes_negative() -> None:
    nb, na = cert_times(T0, 30)
    assert Schedule().renew_delay(nb, na, T0 + timedelta(seconds=10), 0.5) == pytest.approx(5)
    assert Schedule().renew_delay(nb, na, T0 + timedelta(seconds=40), 0.5) == 0.0


def test_backoff_doubles_and_is_capped() -> None:
    s = Schedule(backoff_initial=1, backoff_max=60)
    top = [s.retry_delay(n, 10_000, 0.999999) for n in range(1, 10)]
    assert top == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60, 60], abs=1e-3)
    low = [s.retry_delay(n, 10_000, 0.0) for n in range(1, 4)]
    assert low == pytest.approx([0.5, 1, 2])  # jitter spreads a fleet's retries


def test_backoff_tightens_near_expiry_but_not_below_the_floor() -> None:
    s = Schedule(backoff_initial=1, backoff_max=60)
    assert s.retry_delay(8, 9.0, 0.999999) == pytest.approx(3.0)  # a third of what is left
    assert s.retry_delay(8, 1.5, 0.999999) == pytest.approx(1.0)  # never hammer the authority


def test_a_lost_watch_comes_back_fully_jittered_over_two_seconds() -> None:
    """After an authority restart every sidecar loses its parked watch at once: the
    first retries are spread over [0, 2 s), not bunched in the same half second."""
    pacing = Pacing()
    draws = [i / 1000 for i in range(1000)]
    first = [pacing.watch_retry(1, r) for r in draws]
    assert all(0.0 <= d < 2.0 for d in first)
    assert min(first) == 0.0 and max(first) > 1.99
    assert sum(d < 0.5 for d in first) == 250  # a quarter comes back in the first half second
    # then the window doubles, up to the cap
    assert [pacing.watch_retry(n, 0.999999) // 1 for n in (2, 3, 4, 9)] == [3, 7, 9, 9]
    assert pacing.watch_retry(50, 0.999999) < WATCH_RETRY_MAX


def test_expiry_state() -> None:
    nb, na = cert_times(T0, 40)
    s = Schedule()
    assert s.state(nb, na, T0 + timedelta(seconds=20)) == OK
    assert s.state(nb, na, T0 + timedelta(seconds=31)) == EXPIRING  # under a quarter left
    assert s.state(nb, na, T0 + timedelta(seconds=40)) == EXPIRED


# -- the loop --


@dataclass
class FakeLeaf:
    not_valid_before_utc: datetime


@dataclass
class FakeSvid:
    leaf: FakeLeaf
    not_after: datetime


class World:
    """An authority that issues 30 s certificates, and can be made to fail."""

    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self.fail_next = 0
        self.renewed_at: list[float] = []
        self.failures: list[tuple[str, int, float, float]] = []
        nb, na = cert_times(self.wall(), ttl)
        self.svid = FakeSvid(FakeLeaf(nb), na)

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=trio.current_time())

    def current(self) -> tuple[datetime, datetime]:
        return self.svid.leaf.not_valid_before_utc, self.svid.not_after

    async def renew(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ControlPlaneError("control plane down", reason="authority_unreachable")
        nb, na = cert_times(self.wall(), self.ttl)
        self.svid = FakeSvid(FakeLeaf(nb), na)
        self.renewed_at.append(trio.current_time())

    def on_failure(self, exc: MeshIdError, failures: int, left: float, retry: float) -> None:
        self.failures.append((exc.reason, failures, left, retry))


async def run_for(world: World, seconds: float, rand: float = 0.5) -> None:
    with trio.move_on_after(seconds):
        await renewal_loop(
            Schedule(),
            world.current,
            world.renew,
            world.wall,
            world.on_failure,
            rand=lambda: rand,
        )


async def test_loop_renews_every_half_lifetime(autojump_clock: trio.testing.MockClock) -> None:
    world = World()
    await run_for(world, 100)
    assert world.renewed_at == pytest.approx([15, 30, 45, 60, 75, 90])
    assert world.failures == []


async def test_jitter_moves_each_renewal_within_ten_percent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    early = World()
    await run_for(early, 40, rand=0.0)
    late = World()  # issued at t=40
    await run_for(late, 40, rand=0.999999)
    assert early.renewed_at[0] == pytest.approx(12, abs=1e-3)
    assert late.renewed_at[0] == pytest.approx(40 + 18, abs=1e-3)  # second run starts at t=40


async def test_failures_back_off_then_recover(autojump_clock: trio.testing.MockClock) -> None:
    world = World()
    world.fail_next = 3
    await run_for(world, 40)
    # due at 15; fails at 15, then retries after 0.75, 1.5, 3 s (backoff times 0.75 at rand 0.5)
    assert [f[1] for f in world.failures] == [1, 2, 3]
    assert world.renewed_at[0] == pytest.approx(15 + 0.75 + 1.5 + 3.0)
    lefts = [f[2] for f in world.failures]
    assert lefts == sorted(lefts, reverse=True) and all(left > 0 for left in lefts)
    # and the schedule is back to half-life from the new certificate
    assert world.renewed_at[1] == pytest.approx(world.renewed_at[0] + 15)


async def test_outage_longer_than_the_lifetime_reports_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World()
    world.fail_next = 10_000
    await run_for(world, 60)
    assert world.renewed_at == []
    lefts = [f[2] for f in world.failures]
    assert lefts[0] == pytest.approx(15) and min(lefts) < 0  # kept trying past expiry
    # it kept trying while the certificate lived, without hammering: at most one per second
    attempts_before_expiry = [f for f in world.failures if f[2] > 0]
    assert 4 <= len(attempts_before_expiry) <= 15


def test_retry_after_is_honoured_unless_it_would_let_the_svid_lapse() -> None:
    s = Schedule()
    assert s.retry_delay(1, 3600.0, 0.0, retry_after=20.0) == pytest.approx(20.0)
    # replicas refused together come back spread over a tenth of Retry-After
    assert s.retry_delay(1, 3600.0, 0.5, retry_after=20.0) == pytest.approx(21.0)
    assert s.retry_delay(1, 3600.0, 1.0, retry_after=20.0) == pytest.approx(22.0)
    assert s.retry_delay(8, 3600.0, 0.5, retry_after=2.0) == pytest.approx(45.0)  # backoff later
    assert s.retry_delay(1, 30.0, 0.5, retry_after=600.0) == pytest.approx(10.0)  # a third left


async def test_a_rate_limited_renewal_comes_back_after_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(ttl=3600.0)
    refusals = [7.0, 7.0]

    async def renew() -> None:
        if refusals:
            raise ControlPlaneError(
                "renewed too often",
                reason="renewal_rate_limited",
                status=429,
                retry_after=refusals.pop(),
            )
        await world.renew()

    with trio.move_on_after(1900):
        await renewal_loop(
            Schedule(), world.current, renew, world.wall, world.on_failure, rand=lambda: 0.5
        )
    # due at 1800; refused, back after 7 s and a twentieth (not the 0.75 s backoff),
    # refused again, as long again
    assert [f[0] for f in world.failures] == ["renewal_rate_limited"] * 2
    assert [f[3] for f in world.failures] == pytest.approx([7.35, 7.35])
    assert world.renewed_at == pytest.approx([1800 + 7.35 + 7.35])
