"""What the control plane does with a request: watches, group commit, and the poller.

Theory of operation: one poller reads the database's version counters every
`poll_interval` and wakes every parked watch when one moves; once a second it
also lets the root keeper act and refreshes the server's certificate. On
PostgreSQL a listener (`ca.pgshared.ChangeListener`) reads the versions as
soon as any instance commits a change; while its LISTEN stands, the poller
reads them only once a second, as the fallback for a notice lost with a
connection, and at `poll_interval` again as soon as the LISTEN is down. Signing
requests (enroll, renew, report) queue for the batcher, which answers up to
MAX_BATCH of them in one database transaction: one fsync for many SVIDs.

A watch is a long poll (one feed, once the versions move) or, with
``stream=1``, a stream: a feed a line each time they move, until its wait is
over. A change wakes every parked watch at once. Their feeds queue for the feed
reader, which reads up to MAX_FEEDS of them in one call to the database
thread: each call is a trip to another thread and back (and a wait for the
GIL), which, taken once per watcher, made a change reach ten thousand
sidecars in minutes rather than seconds. Every sidecar that got its feed
parks its next watch at once; those are checked (caller, versions) the same
way, up to MAX_FEEDS in one call: checked one by one, the re-parking fleet
took the database thread in turns and the feeds still to be read queued
behind it. A stream asks nothing again: reading, checking and parking those
requests cost about as much as the feeds, so the sidecar streams.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import trio

from ca.adminapi import audit_run, authorise_run
from ca.adminrun import run_for_operator
from ca.api import Reply, Request, error
from ca.plane import (
    RETRY_AFTER,
    A,
    PlaneState,
    WatchCheck,
    _failure_fields,
    _Queue,
    _unavailable,
)
from meshid.spiffeid import SpiffeId
from meshid.svid import leaf_spiffe_id
from meshid.wire import ADMIN_RUN, ENROLL, RENEW, REPORT, WATCH, WatchQuery

BATCHED_PATHS = (ENROLL, RENEW, REPORT)  # writes: group-committed
MAX_BATCH = 128
MAX_FEEDS = 256  # feeds read in one database call; the event loop sends replies in between
WATCH_EXPIRY_MARGIN = 1.0  # seconds: a long poll ends this long before the caller's SVID


HEARD_EVERY = 5  # seconds between two "this instance is alive" rows (ca.instances)


def _same(reply: Reply) -> Reply:
    return reply


class Dispatcher(PlaneState):
    __slots__ = ()

    # -- the version poller --

    async def _poll(self) -> None:
        """Follow the database's versions; a failure is logged when it starts and when it
        ends, not on every tick (a full disk would otherwise fill the log too)."""
        ticks = 0
        failing: str | None = None
        while True:
            await trio.sleep(self.options.poll_interval)
            ticks += 1
            try:
                per_second = max(1, round(1 / self.options.poll_interval))
                if ticks % (HEARD_EVERY * per_second) == 0:
                    await self._db_call(self.authority.heard)
                    if self.authority.store.instance:  # other instances' rows (ca.audit)
                        await self._db_call(self.authority.store.witness_audit)
                second = ticks % per_second == 0
                if second:
                    await self._db_call(self.root_keeper.tick)  # logs its own failures
                    await self._db_call(self.metrics.refresh, self.authority)
                    if self.options.ui is not None:
                        await self._db_call(self.graph.refresh, self.authority)
                    await self._db_call(self.authority.advance_roots)
                    await self._refresh_credentials()
                    await self._db_call(self.pruner.tick)  # logs its own failures
                listening = self.listener is not None and self.listener.healthy
                versions = (
                    await self._db_call(self.authority.versions)
                    if second or not listening
                    else None
                )
            except Exception as exc:  # a full disk, a locked or broken database: try again
                fields = _failure_fields(exc)
                if fields["reason"] != failing:
                    failing = fields["reason"]
                    self.log("poll_failed", **fields)
                continue
            if failing is not None:
                self.log("poll_recovered", reason=failing)
                failing = None
            if versions is not None:
                self._observe(versions)

    async def _listen(self) -> None:
        """Wake the watches as soon as another instance (or process) commits a change."""
        assert self.listener is not None

        async def wake() -> None:
            try:
                self._observe(await self._db_call(self.authority.versions))
            except Exception as exc:  # the poller reports a failing database; it retries too
                self.log("listen_read_failed", **_failure_fields(exc))

        await self.listener.run(wake, self.log)

    def _observe(self, versions: tuple[int, int, int]) -> None:
        """Record the newest versions seen; wake every parked watcher when they move."""
        if versions != self._versions:
            self._versions = versions
            self._changed.set()
            self._changed = trio.Event()

    def _read_ahead(self, versions: tuple[int, int, int]) -> None:
        """Versions a request read from the database: the poller's too if they are newer.

        A request may read a change the poller has not seen yet. One that read its
        versions before a change the poller has since seen (a stream's line then
        took seconds to write) must not take them back: every parked watch would
        wake and be sent the feed it already has.
        """
        if all(new >= old for new, old in zip(versions, self._versions, strict=True)):
            self._observe(versions)

    # -- requests --

    async def _dispatch(self, req: Request) -> Reply:
        if req.method == "GET" and req.path == WATCH:
            return await self._watch(req)
        if req.method == "POST" and req.path in BATCHED_PATHS:
            return await self._signed(req)
        if req.method == "POST" and req.path == ADMIN_RUN:
            return await self._admin_run(req)
        return await self._db_call(self.api.handle, req)

    async def _watch(self, req: Request) -> Reply:
        """A long poll (the feed once the versions move), or with stream=1 a stream of them."""
        streamed = req.query.get("stream") == "1"
        reply, seen = await self._checks.ask(req)
        if reply is not None and not (streamed and reply.status == 200):
            return reply  # a refusal, or a long poll that is behind: its feed at once
        self._read_ahead(seen)
        assert req.peer_cert is not None  # watch_check refused the anonymous
        caller = req.peer_id if req.peer_id is not None else leaf_spiffe_id(req.peer_cert)
        if (
            self._watching >= self.options.max_watches
            or self._watches.get(caller, 0) >= self.options.max_watches_per_identity
        ):
            if reply is not None:  # a stream that is behind: its feed alone, as a long poll
                return reply
            # Not an unchanged feed at once: the sidecar would ask again at once, in a loop.
            return error(
                429,
                "too_many_watches",
                "too many long polls are parked; try again later",
                retry_after=str(RETRY_AFTER),
            )
        asked = WatchQuery.parse(req.query).wait  # watch_check read the versions already
        wait = min(self.options.watch_timeout if asked is None else asked, 60.0)
        # Answer while the caller's certificate is still good: the reply checks the
        # caller again, and a watch parked past that expiry would end in an error
        # the sidecar backs off from, missing changes meanwhile.
        left = (req.peer_cert.not_valid_after_utc - self.clock.wall()).total_seconds()
        deadline = trio.current_time() + min(wait, max(0.0, left - WATCH_EXPIRY_MARGIN))
        if streamed:
            stream = partial(self._stream, req, caller, reply, seen, deadline)
            return Reply(200, {}, stream=stream)
        with self._parked(caller), trio.CancelScope(deadline=deadline):
            while self._versions == seen:
                await self._changed.wait()
        return await self._feeds.ask(req)

    async def _stream(
        self,
        req: Request,
        caller: SpiffeId,
        first: Reply | None,
        seen: tuple[int, int, int],
        deadline: float,
        send: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Send the caller's feed each time the versions move, until `deadline`.

        `first`: the feed of a caller that is behind, sent at once; else the caller
        holds `seen`, the current versions.

        Each feed is read as a watch from the versions sent last (so a delta
        follows a delta), in the batches every woken watch shares, and the
        caller is checked again with each: a refusal (revoked meanwhile) ends
        the stream, and the sidecar's next request is refused with the reason.
        """
        # The deadline ends the waits for a change, never a line half-way: `send` has a
        # timeout of its own, and the server stopping still cuts it at once.
        with self._parked(caller):
            if first is not None:
                await send(first.encode())
                req, seen = _after(req, first)
            else:  # the head alone, now: read by the caller before a change, not with it
                await send(b"")
            while True:
                with trio.CancelScope(deadline=deadline) as waiting:
                    while self._versions == seen:
                        await self._changed.wait()
                    reply = await self._feeds.ask(req)
                if waiting.cancelled_caught or reply.status != 200:
                    return
                req, seen = _after(req, reply)
                self._read_ahead(seen)
                await send(reply.encode())

    @contextmanager
    def _parked(self, caller: SpiffeId) -> Iterator[None]:
        """Count a parked watch, in all and for its caller (the admission caps)."""
        self._watching += 1
        self._watches[caller] = self._watches.get(caller, 0) + 1
        try:
            yield
        finally:
            self._watching -= 1
            if self._watches[caller] <= 1:
                del self._watches[caller]
            else:
                self._watches[caller] -= 1

    async def _admin_run(self, req: Request) -> Reply:
        """An operator's command: authorised and audited in the database thread, run outside it."""
        authorised = await self._db_call(authorise_run, self.api, req)
        if isinstance(authorised, Reply):
            return authorised
        operator, call = authorised

        async def audit(**outcome: object) -> None:
            await self._db_call(partial(audit_run, self.api, req, operator, call, **outcome))

        return await run_for_operator(
            operator, call, self.authority.state_dir, self._runs, audit=audit
        )

    async def _signed(self, req: Request) -> Reply:
        """Queue a signing request; the batcher signs everything queued in one transaction."""
        return await self._signing.ask(req)

    async def _batcher(self) -> None:
        signing, handle = self._signing, self.api.handle_batch
        await self._answer_queued(signing, handle, MAX_BATCH, "batch_failed", _same)

    async def _feed_reader(self) -> None:
        feeds, handle = self._feeds, self.api.handle_each
        await self._answer_queued(feeds, handle, MAX_FEEDS, "feeds_failed", _same)

    async def _watch_checker(self) -> None:
        def lost(reply: Reply) -> WatchCheck:
            return reply, (0, 0, 0)

        checks, check = self._checks, self.api.watch_check_each
        await self._answer_queued(checks, check, MAX_FEEDS, "checks_failed", lost)

    async def _answer_queued(
        self,
        queue: _Queue[A],
        answer: Callable[[list[Request]], list[A]],
        most: int,
        failed: str,
        lost: Callable[[Reply], A],
    ) -> None:
        """Answer what `queue` holds, up to `most` requests in one database call.

        When the call fails, every request of the batch is answered with
        `lost` of a 503 (the caller's `_retry_later` keeps it one).
        """
        while True:
            batch = await queue.wait_batch(most)
            with trio.CancelScope(shield=True):  # callers are waiting on every slot
                try:
                    replies = await self._db_call(answer, [slot.request for slot in batch])
                except Exception as exc:  # the batch is lost, not the server: retry later
                    fields = _failure_fields(exc)
                    self.log(failed, requests=len(batch), **fields)
                    replies = [lost(_unavailable(fields["reason"]))] * len(batch)
            for slot, reply in zip(batch, replies, strict=True):
                slot.reply = reply
                slot.done.set()
            await trio.lowlevel.checkpoint()  # let the answered go before the next batch


def _after(req: Request, sent: Reply) -> tuple[Request, tuple[int, int, int]]:
    """The watch `req` as the caller makes it once it holds the feed `sent`; its versions."""
    body = sent.body
    held = (body["policy_version"], body["revocation_version"], body["bundle_sequence"])
    query = {
        **req.query,
        "policy_version": str(held[0]),
        "revocation_version": str(held[1]),
        "bundle_sequence": str(held[2]),
    }
    return replace(req, query=query), held
