"""A watch with stream=1: one request, every change as a line, the caller checked with each.

Real TLS on 127.0.0.1 against a real `ControlPlane`, through the sidecar's own
client (`sidecar.control.ControlClient`), which hands on each streamed
document as its line completes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from ca_helpers import TD, Clock
from test_control_keepalive import WEB, Served, held, serial, serving

from ca.api import Reply
from meshid.feedwire import Feed
from meshid.spiffeid import SpiffeId
from meshid.wire import WatchQuery
from sidecar.control import ControlPlaneError, HeldIdentity

API = SpiffeId(TD, "/api")


@pytest.fixture
async def served(state: Path, clock: Clock) -> AsyncIterator[Served]:
    async with serving(state, clock, max_watches_per_identity=1) as served:
        yield served


class Watcher:
    """One streamed watch, the feeds it brought, and an event per feed."""

    def __init__(self, served: Served, ident: HeldIdentity) -> None:
        self.served = served
        self.ident = ident
        self.feeds: list[Feed] = []
        self.arrived = trio.Event()

    async def take(self, doc: dict[str, Any]) -> None:
        self.feeds.append(Feed.parse(doc))
        self.arrived.set()
        self.arrived = trio.Event()

    async def until(self, count: int) -> None:
        while len(self.feeds) < count:
            await self.arrived.wait()

    async def watch(self, query: WatchQuery) -> dict[str, Any]:
        return await self.served.client.request(
            "GET",
            query.target(),
            None,
            bundle_pem=self.served.bundle_pem,
            now=self.served.clock(),
            identity=self.ident,
            wait=query.wait + 10 if query.wait is not None else None,
            each=self.take,
        )


async def test_one_watch_brings_every_change_as_it_happens(served: Served) -> None:
    authority = served.authority
    watcher = Watcher(served, held(authority))
    # long enough for two changes on a loaded machine; the test waits for its end
    query = WatchQuery(*authority.versions(), wait=4, delta=True, stream=True)
    held_version = query.policy_version
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            done: list[dict[str, Any]] = []

            async def run() -> None:
                done.append(await watcher.watch(query))

            nursery.start_soon(run)
            while served.server._watching < 1:  # noqa: ASYNC110 (parked: the change comes after)
                await trio.sleep(0.01)
            first = authority.allow(API, WEB)
            await watcher.until(1)
            second = authority.allow(WEB, API)
            await watcher.until(2)
        # the stream ended when its wait was over, without a feed more
    assert [f.policy_version for f in watcher.feeds] == [first, second]
    # deltas, each cut from the version the one before it brought
    assert [f.delta.base_version if f.delta else None for f in watcher.feeds] == [
        held_version,
        first,
    ]
    assert watcher.feeds[0].delta is not None
    assert watcher.feeds[0].delta.pairs_added == ((API, WEB),)
    assert Feed.parse(done[0]).policy_version == second  # the last line, returned
    assert served.server._watching == 0
    # one connection for all of it, and kept for the next request
    with trio.fail_after(10):
        await served.get(watcher.ident)
    assert served.server.serials == [serial(watcher.ident)]


async def test_a_watch_behind_gets_its_feed_at_once_whole_then_the_changes(
    served: Served,
) -> None:
    authority = served.authority
    # a whole list of ~300 KiB: its line spans many TLS records
    authority.apply_policy((str(SpiffeId(TD, f"/svc{i}")), str(WEB)) for i in range(3000))
    watcher = Watcher(served, held(authority))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.watch, WatchQuery(wait=20, stream=True))
            await watcher.until(1)
            version = authority.deny(SpiffeId(TD, "/svc7"), WEB)
            await watcher.until(2)
            nursery.cancel_scope.cancel()
    whole, changed = watcher.feeds
    assert whole.delta is None and len(whole.pairs) == 3000
    assert changed.policy_version == version and changed.delta is None  # no delta asked
    assert (SpiffeId(TD, "/svc7"), WEB) not in changed.pairs and len(changed.pairs) == 2999


async def test_a_caller_revoked_mid_stream_is_cut_off_and_told_why_next_time(
    served: Served,
) -> None:
    authority = served.authority
    watcher = Watcher(served, held(authority))
    query = WatchQuery(*authority.versions(), wait=20, stream=True)
    with trio.fail_after(15):
        last = {"unset": True}

        async def run() -> None:
            last.update(await watcher.watch(query))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            while served.server._watching < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
            authority.revoke(WEB)
        # the stream ended at the revocation, long before its wait, with no feed for it
        assert watcher.feeds == [] and last == {"unset": True}
        with pytest.raises(ControlPlaneError) as refused:
            await watcher.watch(query)
    assert refused.value.reason == "identity_revoked"


async def test_a_stream_is_a_parked_watch_for_the_admission_caps(served: Served) -> None:
    """Past the caps a stream is refused; one that is behind still gets its feed (one
    line) at once, as a long poll does: it needs no parked watch to learn of the change."""
    authority = served.authority
    first, second = Watcher(served, held(authority)), Watcher(served, held(authority))
    query = WatchQuery(*authority.versions(), wait=20, stream=True)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.watch, query)
            while served.server._watching < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
            with pytest.raises(ControlPlaneError) as refused:  # one per identity here
                await second.watch(query)
            last = await second.watch(WatchQuery(wait=20, stream=True))  # behind: at once
            nursery.cancel_scope.cancel()
    assert refused.value.status == 429 and refused.value.reason == "too_many_watches"
    assert [f.policy_version for f in second.feeds] == [authority.versions()[0]]
    assert Feed.parse(last) == second.feeds[0]


async def test_one_feed_answered_whole_reads_as_a_stream_of_one(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an authority from before streams sends: one feed, and no newline after it."""

    def unterminated(reply: Reply) -> bytes:
        return reply.raw if reply.raw is not None else json.dumps(reply.body).encode()

    monkeypatch.setattr(Reply, "encode", unterminated)
    watcher = Watcher(served, held(served.authority))
    with trio.fail_after(10):
        last = await watcher.watch(WatchQuery(wait=0))  # behind: answered at once, whole
    assert len(watcher.feeds) == 1
    assert Feed.parse(last) == watcher.feeds[0]
    assert watcher.feeds[0].policy_version == served.authority.versions()[0]
