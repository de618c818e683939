"""What instances of one trust domain on PostgreSQL share: change notices, failure counts.

Two state directories, one database, two real control planes on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from ca_helpers import TD, Clock

from ca.authority import Authority
from ca.backend import Database
from ca.pgshared import ChangeListener, DbFailureLimiter
from ca.server import ControlPlane, ServerOptions
from meshid.feedwire import Feed
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_to_pem, generate_key, key_to_pem
from meshid.wire import WatchQuery
from sidecar.control import ClientIdentity, ControlClient, ControlPlaneError
from sidecar.dynamic import build_csr

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


@dataclass
class Instance:
    server: ControlPlane
    handle: Authority  # a connection of the test's own, as a CLI command on this host has
    port: int
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event]


def two_instances(tmp_path: Path, pg_url: str, clock: Clock) -> tuple[Path, Path]:
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    Authority.join(
        tmp_path / "two",
        Database(pg_url, "two"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(0),
        clock=clock,
    ).close()
    return tmp_path / "one", tmp_path / "two"


@asynccontextmanager
async def serving(
    state: Path, clock: Clock, *, poll_interval: float, listener: ChangeListener | None = None
) -> AsyncIterator[Instance]:
    served = Authority.open(state, clock=clock)
    handle = Authority.open(state, clock=clock)
    events: list[tuple[str, dict[str, Any]]] = []
    server = ControlPlane(
        served,
        ServerOptions(host="127.0.0.1", port=0, request_timeout=5.0, poll_interval=poll_interval),
        log=lambda event, **f: events.append((event, f)),
        clock=clock,
        listener=listener,
    )
    try:
        async with trio.open_nursery() as nursery:
            _host, port = await nursery.start(server.serve)
            yield Instance(server, handle, port, events)
            nursery.cancel_scope.cancel()
    finally:
        handle.close()
        served.close()


async def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - a condition of the server's, no event to wait on
            await trio.sleep(0.01)


class Watcher:
    """A sidecar's long poll of the feed, on one instance, with the sidecar's own wire code."""

    def __init__(self, instance: Instance, tmp: Path, clock: Clock) -> None:
        key = generate_key()
        issued = instance.handle.issue(WEB, key.public_key())
        tmp.mkdir(exist_ok=True)
        (tmp / "svid.key").write_bytes(key_to_pem(key))
        (tmp / "svid.pem").write_bytes(certs_to_pem(issued.chain))
        self.identity = ClientIdentity(tmp / "svid.pem", tmp / "svid.key")
        self.bundle = instance.handle.bundle().to_pem()
        self.client = ControlClient("127.0.0.1", instance.port, TD)
        self.clock = clock

    async def feed(self, query: WatchQuery) -> Feed:
        doc = await self.client.request(
            "GET",
            query.target(),
            None,
            bundle_pem=self.bundle,
            now=self.clock(),
            identity=self.identity,
            wait=30,
        )
        return Feed.parse(doc)


async def change_reaches_the_other_instance(
    one: Instance, two: Instance, tmp_path: Path, clock: Clock
) -> None:
    """Park a watch on `two`, deny a pair through `one`: the watch answers within 2 s."""
    one.handle.allow(WEB, API)
    watcher = Watcher(two, tmp_path / "web", clock)
    first = await watcher.feed(WatchQuery(wait=0))
    got: list[Feed] = []

    async def park() -> None:
        query = WatchQuery(
            first.policy_version, first.revocation_version, first.bundle_sequence, wait=20
        )
        got.append(await watcher.feed(query))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(park)
        await wait_until(lambda: two.server._changed.statistics().tasks_waiting > 0)
        one.handle.deny(WEB, API)
        with trio.fail_after(2):
            while not got:  # noqa: ASYNC110 - the watch's own answer ends the loop
                await trio.sleep(0.01)
    assert got[0].policy_version == first.policy_version + 1
    assert [str(WEB), str(API)] not in got[0].pairs


async def test_a_change_on_one_instance_wakes_a_watch_on_the_other_at_once(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    """The poller reads the versions every 30 s here: only a notice can deliver within 2 s."""
    one_dir, two_dir = two_instances(tmp_path, pg_url, clock)
    with trio.fail_after(30):
        async with (
            serving(one_dir, clock, poll_interval=30) as one,
            serving(two_dir, clock, poll_interval=30) as two,
        ):
            assert two.server.listener is not None
            listener = two.server.listener
            await wait_until(lambda: listener.healthy)
            await change_reaches_the_other_instance(one, two, tmp_path, clock)
    assert two.logged("listening") and not two.logged("listen_lost")


def _refuse() -> psycopg.Connection[Any]:
    raise psycopg.OperationalError("connection refused\nDETAIL: second line")


async def test_without_listen_the_poller_still_delivers_a_change(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    one_dir, two_dir = two_instances(tmp_path, pg_url, clock)
    with trio.fail_after(30):
        async with (
            serving(one_dir, clock, poll_interval=0.2, listener=ChangeListener(_refuse)) as one,
            serving(two_dir, clock, poll_interval=0.2, listener=ChangeListener(_refuse)) as two,
        ):
            await wait_until(lambda: bool(two.logged("listen_failed")))
            await change_reaches_the_other_instance(one, two, tmp_path, clock)
    failed = two.logged("listen_failed")[0]
    assert failed["reason"] == "storage_unavailable"
    assert failed["detail"] == "connection refused"
    assert not two.logged("listening")


async def test_a_lost_listen_connection_is_made_again_and_says_why(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    one_dir, two_dir = two_instances(tmp_path, pg_url, clock)
    with trio.fail_after(30):
        async with (
            serving(one_dir, clock, poll_interval=30) as one,
            serving(two_dir, clock, poll_interval=30) as two,
        ):
            await wait_until(lambda: len(two.logged("listening")) == 1)
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'meshid-ca-listen'"
                )
            await wait_until(lambda: len(two.logged("listening")) == 2)
            await change_reaches_the_other_instance(one, two, tmp_path, clock)
    lost = two.logged("listen_lost")
    assert len(lost) == 1 and lost[0]["reason"] == "storage_unavailable"


# -- the enrollment guessing limit --


async def test_failed_enrollments_spread_over_two_instances_hit_one_limit(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    """Five failures from one source, alternating between instances, block it on both:
    counted per instance, neither would have seen more than three."""
    one_dir, two_dir = two_instances(tmp_path, pg_url, clock)
    with trio.fail_after(30):
        async with (
            serving(one_dir, clock, poll_interval=0.2) as one,
            serving(two_dir, clock, poll_interval=0.2) as two,
        ):
            bundle = one.handle.bundle().to_pem()
            outcomes: list[str] = []
            for attempt in range(7):
                port = (one.port, two.port)[attempt % 2]
                body = {"token": "0" * 43, "csr": build_csr(generate_key(), WEB).decode()}
                with pytest.raises(ControlPlaneError) as refused:
                    await ControlClient("127.0.0.1", port, TD).request(
                        "POST", "/v1/enroll", body, bundle_pem=bundle, now=clock()
                    )
                outcomes.append(refused.value.reason)
    assert outcomes[:5] == ["token_unknown"] * 5
    assert outcomes[5:] == ["rate_limited", "rate_limited"]  # on the second, then the first


def _limiter(pg_url: str, **kwargs: Any) -> DbFailureLimiter:
    return DbFailureLimiter(lambda: psycopg.connect(pg_url, autocommit=True), **kwargs)


def test_the_shared_failure_table_stays_bounded(
    tmp_path: Path, pg_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    monkeypatch.setattr("ca.pgshared.MAX_SOURCES", 10)
    monkeypatch.setattr("ca.pgshared.PRUNE_EVERY", 5)
    limiter = _limiter(pg_url)
    try:
        for n in range(60):
            limiter.failed(f"192.0.2.{n}", 0.0)
        with psycopg.connect(pg_url) as conn:
            [(rows,)] = conn.execute("SELECT COUNT(*) FROM enroll_failures").fetchall()
        assert 10 <= rows < 15
        assert limiter.blocked("192.0.2.59", 0.0) == 0.0  # the newest are kept, unblocked
    finally:
        limiter.close()


async def test_the_shared_limiter_blocks_for_its_time_then_forgets_and_fails_open(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    limiter = _limiter(pg_url, max_failures=2, window=60.0, block=0.5)
    other = _limiter(pg_url, max_failures=2, window=60.0, block=0.5)  # another instance
    try:
        assert limiter.failed("192.0.2.1", 0.0) is False
        assert other.failed("192.0.2.1", 0.0) is True
        assert 0.0 < limiter.blocked("192.0.2.1", 0.0) <= 0.5
        assert limiter.active(0.0).keys() == {"192.0.2.1"}
        assert limiter.blocked("192.0.2.2", 0.0) == 0.0
        await wait_until(lambda: limiter.blocked("192.0.2.1", 0.0) == 0.0, 5)
        assert limiter.active(0.0) == {}
    finally:
        limiter.close()
        other.close()
    broken = DbFailureLimiter(_refuse)
    assert broken.failed("192.0.2.1", 0.0) is False
    assert broken.blocked("192.0.2.1", 0.0) == 0.0
