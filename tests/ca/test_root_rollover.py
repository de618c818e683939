"""The control plane keeps its root alive by itself: years on a hand-moved clock.

Each step moves the clock, lets simulated sidecars fetch the bundle (one of
them late) and report the sequence they hold, runs the server's own hook
(`RootKeeper.tick`, then `advance_roots`, as the poller does) and renews
every sidecar's SVID through the authority.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from ca_helpers import TD, Clock, make_csr, query, run
from cryptography import x509

from ca.authority import Authority
from ca.backend import Database
from ca.rootkeeper import RootKeeper
from ca.status import render_status
from ca.values import BUNDLE_RECHECK, propagation_default
from meshid.bundle import TrustBundle
from meshid.clock import ManualClock
from meshid.report import StatusReport
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key, verify_svid

BACKENDS = ("sqlite", "postgresql")  # every test here runs on both engines


@dataclass
class Sidecar:
    sid: SpiffeId
    instance: str
    every: int  # fetches the bundle every this many steps
    held: TrustBundle
    cert: x509.Certificate


class Events:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.lines if e == event]


def _open(
    tmp_path: Path,
    database: Database | None,
    clock: Clock,
    root_ttl: timedelta,
    svid_ttl: timedelta,
    **kw: Any,
) -> Authority:
    return Authority.init(
        tmp_path / "state",
        TD,
        svid_ttl=svid_ttl,
        root_ttl=root_ttl,
        clock=clock,
        database=database,
        **kw,
    )


def _simulate(
    authority: Authority, clock: Clock, step: timedelta, steps: int, events: Events
) -> tuple[timedelta, set[int]]:
    """Run the mesh for `steps` steps; returns the worst SVID shortfall and the roots used."""
    keeper = RootKeeper(authority, events, propagation_default(authority.svid_ttl))
    sidecars = []
    for name, every in (("web", 1), ("api", 1), ("laggard", 3)):
        sid = SpiffeId(TD, f"/{name}")
        issued = authority.issue(sid, generate_key().public_key())
        sidecars.append(Sidecar(sid, f"{name}-0", every, authority.bundle(), issued.leaf))
    worst = timedelta(0)
    signers: set[int] = set()
    for index in range(1, steps + 1):
        clock.advance(step)
        now = clock()
        for car in sidecars:
            if index % car.every == 0:
                car.held = authority.bundle()
            authority.record_report(
                car.sid, StatusReport(car.instance, bundle_sequence=car.held.sequence)
            )
        keeper.tick()
        authority.advance_roots()
        active, _ = authority.root_lifecycle()
        assert active.not_after > now, f"step {index}: active root {active.generation} expired"
        for car in sidecars:
            _, csr = make_csr()
            leaf = authority.renew(car.cert, csr).leaf
            # Every sidecar, including the laggard, can verify the new SVID with what it holds.
            for other in sidecars:
                verify_svid([leaf], other.held.roots, now)
            shortfall = now + authority.svid_ttl - leaf.not_valid_after_utc
            worst = max(worst, shortfall)
            car.cert = leaf
        signers.add(authority.signer()[0])
    return worst, signers


def test_default_year_roots_roll_over_by_themselves(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    """The default one-year root, nine-day SVIDs renewed every four days, for 500 days.

    Root 2 is published at day 182.5 and signs from day ~274; root 3 is
    published at day 365 and signs from day ~456.
    """
    authority = _open(tmp_path, database, clock, timedelta(days=365), timedelta(days=9))
    events = Events()
    worst, signers = _simulate(authority, clock, timedelta(days=4), 125, events)
    assert worst <= timedelta(seconds=1)  # no SVID was cut short (NotAfter has whole seconds)
    assert signers == {1, 2, 3}
    prepared = events.named("root_prepared")
    assert [p["generation"] for p in prepared] == [2, 3]
    assert all(p["reason"] == "root_rotation_due" and p["wait_for_acks"] for p in prepared)
    assert [a["generation"] for a in events.named("root_activated")] == [2, 3]
    assert not events.named("root_expiring") and not events.named("root_rotation_failed")
    assert not events.named("svid_capped_by_root")
    rows = query(authority.state_dir, "SELECT generation, state FROM roots")
    states = {int(str(g)): str(st) for g, st in rows}
    assert states == {1: "retired", 2: "retired", 3: "active"}  # 2's last SVID expired
    assert len(authority.bundle().roots) == 1
    authority.close()


def test_three_minute_roots_roll_over_many_times(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    """`ca init --root-ttl 3m --svid-ttl 1m`: five root lifetimes in fifteen-second steps."""
    authority = _open(tmp_path, database, clock, timedelta(minutes=3), timedelta(minutes=1))
    events = Events()
    worst, signers = _simulate(authority, clock, timedelta(seconds=15), 60, events)
    assert worst <= timedelta(seconds=1)
    assert len(signers) >= 8
    assert not events.named("root_expiring") and not events.named("root_rotation_failed")
    retired = query(authority.state_dir, "SELECT COUNT(*) FROM roots WHERE state = 'retired'")
    assert int(str(retired[0][0])) >= 6
    assert len(authority.bundle().roots) <= 3
    authority.close()


def test_shortest_root_caps_svids_a_little_and_says_so(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    """A 40s root with 30s SVIDs cannot avoid some capping; it stays bounded and is logged.

    The next root is published at once and may sign 15s later (the minimum
    propagation delay), later still while the laggard catches up (5s steps,
    it fetches every third): SVIDs signed meanwhile end with the old root.
    """
    authority = _open(tmp_path, database, clock, timedelta(seconds=40), timedelta(seconds=30))
    events = Events()
    worst, signers = _simulate(authority, clock, timedelta(seconds=5), 60, events)
    assert timedelta(seconds=1) < worst <= timedelta(seconds=20)
    assert len(signers) >= 8
    capped = events.named("svid_capped_by_root")
    assert capped and all(c["reason"] == "root_expiry" for c in capped)
    assert not events.named("root_rotation_failed")
    authority.close()


def test_without_auto_rotation_the_root_expires_loudly_but_rarely(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    authority = _open(tmp_path, database, clock, timedelta(minutes=3), timedelta(minutes=1))
    events = Events()
    keeper = RootKeeper(authority, events, timedelta(seconds=30), auto=False)
    for _ in range(240):  # four minutes, a poll a second
        clock.advance(timedelta(seconds=1))
        keeper.tick()
    assert not events.named("root_prepared")
    assert query(authority.state_dir, "SELECT COUNT(*) FROM roots")[0][0] == 1
    expiring = events.named("root_expiring")
    assert 1 <= len(expiring) <= 4  # warned from 30s before expiry, every 10s at most
    assert expiring[0]["seconds_left"] == 29 or expiring[0]["seconds_left"] == 30
    assert 1 <= len(events.named("root_expired")) <= 8
    lines = render_status(authority)
    assert lines[0].startswith("WARNING root 1 expired at ")
    authority.close()


def test_expired_root_is_replaced_at_once_when_rotation_is_back_on(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    authority = _open(tmp_path, database, clock, timedelta(minutes=3), timedelta(minutes=1))
    clock.advance(timedelta(minutes=4))
    events = Events()
    RootKeeper(authority, events, timedelta(seconds=30)).tick()
    assert events.named("root_prepared")[0]["reason"] == "root_expired"
    authority.advance_roots()
    issued = authority.issue(SpiffeId(TD, "/web"), generate_key().public_key())
    assert issued.leaf.not_valid_after_utc == (clock() + timedelta(minutes=1)).replace(
        microsecond=0
    )
    authority.close()


def test_laggard_holds_activation_until_expiry_is_near(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    """A sidecar that never takes the new bundle delays the rollover, not past the force point."""
    authority = _open(tmp_path, database, clock, timedelta(minutes=3), timedelta(minutes=1))
    events = Events()
    keeper = RootKeeper(authority, events, timedelta(seconds=30))
    stuck = SpiffeId(TD, "/stuck")
    first, _ = authority.root_lifecycle()
    for _ in range(170):
        clock.advance(timedelta(seconds=1))
        authority.record_report(stuck, StatusReport("stuck-0", bundle_sequence=1))
        keeper.tick()
        authority.advance_roots()
        if authority.signer()[0] == 2:
            break
    assert authority.signer()[0] == 2
    # Held back past the planned activation (2m) until the force point, 15s before expiry.
    assert clock() - first.issued_at == timedelta(seconds=165)
    released = events.named("root_released")
    assert released and released[0]["reason"] == "root_expiry_near"
    assert "stuck-0" in released[0]["lagging"]
    assert events.named("root_expiring")  # the operator was warned first
    authority.close()


def test_status_warns_inside_the_window(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    """Thirty days before a one-year root expires, and not a day earlier."""
    authority = _open(tmp_path, database, clock, timedelta(days=365), timedelta(hours=1))
    quiet = run("ca", "status", "--state", str(authority.state_dir))  # the real clock
    assert "WARNING" not in quiet.output and "active root 1 expires in 364d" in quiet.output
    clock.advance(timedelta(days=334))
    assert not any(line.startswith("WARNING") for line in render_status(authority))
    clock.advance(timedelta(days=2))
    loud = render_status(authority)
    assert loud[0].startswith("WARNING root 1 expires at ") and "(in 29d)" in loud[0]
    assert "no next root is published" in loud[0]
    authority.rotate(timedelta(minutes=5))
    assert "root 2 is published but has not taken over" in render_status(authority)[0]
    authority.close()


def test_automatic_rotation_keeps_the_key_encrypted(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    authority = _open(
        tmp_path,
        database,
        clock,
        timedelta(minutes=3),
        timedelta(minutes=1),
        passphrase=b"correct horse",
    )
    events = Events()
    keeper = RootKeeper(authority, events, timedelta(seconds=30))
    clock.advance(timedelta(seconds=95))
    keeper.tick()
    assert events.named("root_prepared")
    key = (authority.state_dir / "keys" / "root-2.key").read_bytes()
    assert key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert (authority.state_dir / "keys" / "root-2.key").stat().st_mode & 0o777 == 0o600
    authority.close()


def test_a_failing_rotation_is_logged_and_retried(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    authority = _open(tmp_path, database, clock, timedelta(minutes=3), timedelta(minutes=1))
    blocker = authority.state_dir / "keys" / "root-2.key"
    blocker.mkdir()  # the next root's key cannot be written
    events = Events()
    keeper = RootKeeper(authority, events, timedelta(seconds=30))
    clock.advance(timedelta(seconds=95))
    assert keeper.tick() is None
    failed = events.named("root_rotation_failed")
    assert failed[0]["reason"] == "internal_error" and failed[0]["detail"] == "IsADirectoryError"
    clock.advance(timedelta(seconds=1))
    keeper.tick()  # backing off: not tried again yet
    assert len(events.named("root_rotation_failed")) == 1
    blocker.rmdir()
    clock.advance(timedelta(seconds=5))
    keeper.tick()
    assert events.named("root_prepared")
    authority.close()


@pytest.mark.parametrize("workers", [2])
def test_two_workers_publish_one_next_root(
    tmp_path: Path, clock: Clock, database: Database | None, workers: int
) -> None:
    """Every server worker runs the hook; only one of them rotates."""
    first = _open(tmp_path, database, clock, timedelta(minutes=3), timedelta(minutes=1))
    others = [Authority.open(first.state_dir, clock=clock) for _ in range(workers - 1)]
    clock.advance(timedelta(seconds=95))
    for authority in (first, *others):
        RootKeeper(authority, Events(), timedelta(seconds=30)).tick()
    assert query(first.state_dir, "SELECT COUNT(*) FROM roots WHERE state = 'next'") == [(1,)]
    for authority in (first, *others):
        authority.close()


def test_offline_issue_says_when_the_root_cuts_an_svid_short(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init = run(
        "ca", "init", "--state", str(state), "--trust-domain", "example.org",
        "--svid-ttl", "1m", "--root-ttl", "10m",
    )  # fmt: skip
    assert init.exit_code == 0, init.output
    whole = run("ca", "issue", "web", "--state", str(state), "--out", str(tmp_path / "a"))
    assert whole.exit_code == 0 and "svid_capped_by_root" not in whole.output
    cut = run(
        "ca", "issue", "web", "--state", str(state), "--out", str(tmp_path / "b"), "--ttl", "1h"
    )
    assert cut.exit_code == 0
    assert "warning: svid_capped_by_root: cut short to the root's own expiry" in cut.output


def test_concurrent_rotations_make_one_root_whose_key_matches(
    tmp_path: Path, clock: Clock, database: Database | None
) -> None:
    """Workers (and an operator's `ca rotate`) racing to rotate: one wins, nothing clobbered."""
    first = _open(tmp_path, database, clock, timedelta(minutes=3), timedelta(minutes=1))
    racers = [Authority.open(first.state_dir, clock=clock) for _ in range(4)]
    barrier = threading.Barrier(len(racers))
    results: list[object] = []

    def race(authority: Authority) -> None:
        barrier.wait(timeout=10)
        results.append(authority.rotate_unless_pending(timedelta(0), wait_for_acks=False))

    threads = [threading.Thread(target=race, args=(a,)) for a in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == len(racers)
    assert sum(r is not None for r in results) == 1
    first.advance_roots()
    generation, root, key = first.signer()
    assert generation == 2
    assert root.public_key() == key.public_key()
    for authority in (first, *racers):
        authority.close()


def test_a_root_published_elsewhere_shows_in_the_bundle_after_the_recheck_interval(
    state: Path, clock: Clock
) -> None:
    """The bundle is looked at again every BUNDLE_RECHECK of monotonic time, driven here
    by a manual clock: no sleep, and the edge of the interval is exact."""
    frozen = ManualClock(clock.now)
    authority = Authority.open(state, clock=frozen)
    other = Authority.open(state, clock=frozen)
    try:
        before = authority.bundle().sequence
        other.rotate(timedelta(minutes=1))
        frozen.advance(timedelta(seconds=BUNDLE_RECHECK) - timedelta(milliseconds=1))
        assert authority.bundle().sequence == before  # still the cached bundle
        frozen.advance(timedelta(milliseconds=2))  # past it
        assert authority.bundle().sequence == before + 1
        assert len(authority.bundle().roots) == 2
    finally:
        other.close()
        authority.close()
