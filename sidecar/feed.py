"""Following the feed: the allow-list, revocations and trust bundle, as the authority moves them.

The watcher streams the feed from the versions it holds: the control plane
sends a new feed each time one moves, for the watch's wait (25 s), and the
watcher asks again (an authority from before streams answers once). A new
allow-list or revocation is installed at once (live connections it now
denies are closed); a new bundle becomes a new
credential generation with the same SVID, so rolled-in roots are trusted
before anything is signed by them. Both are in force before they are written
to the state directory. The authority refusing us as revoked revokes us here
too, once, with what the operator must do.

When what the authority revoked is the SVID we hold (`ca revoke --serial`,
its refusal names the serial), the identity is fine but this certificate
and its key are not: the sidecar cuts itself off as if revoked (peers refuse
that SVID already), says so once, and at every slow retry of the watch
enrolls again with `authority.token_file` (a new token the operator wrote
there) or `jwt_file`. Renewing is no way out: the authority refuses to renew
a revoked SVID, which would launder it. Once enrolled again, the whole feed
is asked for, and the authority's allow-list replaces the cut-off.

Once it holds a whole feed, the watcher asks for deltas (`meshid.feedwire`):
the authority then answers with the allow-list changes since our version, or
with the whole list when its history no longer reaches back that far. A
delta cut from another version than ours is refused (`feed_delta_refused`)
and the whole list asked for at once. What is installed and saved is always
the whole feed, the delta applied.

`FeedFollower` is a part of `sidecar.dynamic.DynamicIdentity`, which holds
the state it declares below and the helpers it names.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import trio

from meshid.bundle import TrustBundle
from meshid.errors import InvalidSvid
from meshid.federation import federated_from_json
from meshid.feedwire import DeltaMismatch, Feed
from meshid.policy import Policy
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from meshid.wire import WatchQuery, WireError
from sidecar.config import AuthoritySource
from sidecar.control import ControlPlaneError
from sidecar.credentials import Svid
from sidecar.link import AuthorityLink
from sidecar.renewal import (
    DUTY_WATCH,
    IDENTITY_REVOKED,
    WATCH_WAIT,
    Pacing,
    as_meshid,
    permanent,
)
from sidecar.reporting import Reporter
from sidecar.schedule import Schedule
from sidecar.state import Current
from sidecar.statedir import BUNDLE, FEED, StateDir

if TYPE_CHECKING:
    from sidecar.dynamic import Host

SVID_PROBLEM = "svid"  # what /readyz notes while the SVID we hold is revoked


def _same_bundles(a: tuple[TrustBundle, ...], b: tuple[TrustBundle, ...]) -> bool:
    """The same federated trust domains, each with the same sequence and roots."""
    return len(a) == len(b) and all(
        x.trust_domain == y.trust_domain and x.sequence == y.sequence and x.same_roots(y)
        for x, y in zip(a, b, strict=True)
    )


def _whole(feed: Feed, query: WatchQuery, held: Feed | None) -> Feed:
    """The feed as a whole one: a delta applied to what we hold, if we asked for one."""
    if feed.delta is None:
        return feed
    if not query.delta or held is None:
        raise WireError("delta: sent, but this sidecar asked for the whole feed")
    return feed.applied_to(held)


class FeedFollower(ABC):
    current: Current
    host: Host
    link: AuthorityLink
    state: StateDir
    pacing: Pacing
    schedule: Schedule
    rand: Callable[[], float]
    reporter: Reporter
    source: AuthoritySource
    versions: tuple[int, int, int]
    _feed: Feed | None
    _revoked_svid: int | None  # the serial of our SVID the authority said it revoked

    # Provided by DynamicIdentity, which this mixin's methods are part of.
    @abstractmethod
    def _skew(self) -> timedelta: ...

    @abstractmethod
    def _note(self, duty: str, exc: BaseException | None) -> None: ...

    @abstractmethod
    def _write_bundle(self) -> None: ...

    @abstractmethod
    def _write_feed(self) -> None: ...

    @abstractmethod
    async def _enroll_again(self) -> None: ...

    def _apply_policy(self, feed: Feed) -> None:
        td = self.current.identity.trust_domain
        prefixed = [SpiffeId.parse(end.removesuffix("/*")) for r in feed.prefix_rules for end in r]
        federated = {b.trust_domain for b in federated_from_json(json.loads(feed.federated), td)}
        for sid in [*feed.revoked, *(x for pair in feed.pairs for x in pair), *prefixed]:
            if sid.trust_domain != td and sid.trust_domain not in federated:
                raise InvalidSvid(
                    f"feed names {sid} of a trust domain that is not federated",
                    reason=Reason.BAD_FEED,
                )
        self.host.install_policy(
            Policy.build(
                list(feed.pairs),
                feed.policy_version,
                list(feed.revoked),
                feed.revocation_version,
                feed.revoked_serials,
                feed.prefix_rules,
            )
        )
        self.host.install_addresses({(h, p): sid for h, p, sid in feed.addresses})
        self.versions = (feed.policy_version, feed.revocation_version, feed.bundle_sequence)

    def _apply_bundle(self, feed: Feed) -> bool:
        """Install the feed's bundle if it is new; True if it was (and should be saved)."""
        svid = self.current.svid()
        if svid is None:
            return False
        bundle = TrustBundle.from_pem(
            self.current.identity.trust_domain,
            feed.bundle.encode(),
            sequence=feed.bundle_sequence,
            what="bundle from the feed",
        )
        federated = federated_from_json(
            json.loads(feed.federated), self.current.identity.trust_domain
        )
        if (
            bundle.same_roots(svid.bundle)
            and bundle.sequence == svid.bundle.sequence
            and _same_bundles(federated, svid.federated)
        ):
            return False
        updated = Svid.check(
            list(svid.chain),
            svid.key,
            bundle,
            self.current.identity,
            self.current.wall(),
            self._skew(),
            federated,
        )
        self.host.install_svid(updated, "bundle_updated")
        self.reporter.poke()  # a root rollover waits for this acknowledgement
        return True

    async def _poll_feed(self, query: WatchQuery, wait: float) -> None:
        """One watch: each feed of its answer installed as it arrives (a stream may bring
        several: `meshid.wire.WatchQuery`).

        Asked again of another server (failover) once a feed of the answer is in,
        it asks from the versions that feed brought: from those `query` names,
        a delta would come cut from a version no longer held, and be refused.
        """
        asked = query

        async def take(doc: dict[str, Any]) -> None:
            nonlocal asked
            await self._take_feed(query, doc)
            pv, rv, bs = self.versions
            asked = replace(query, policy_version=pv, revocation_version=rv, bundle_sequence=bs)

        try:
            await self.link.ask("GET", lambda: asked.target(), None, wait=wait, each=take)
        except DeltaMismatch as exc:
            self.host.events.emit("feed_delta_refused", reason=exc.reason, detail=exc.message)
            # -1: a version no authority holds, so the whole list comes back at once.
            _, rv, bs = self.versions
            await self._poll_feed(WatchQuery(-1, rv, bs, wait=0), wait)

    async def _take_feed(self, query: WatchQuery, doc: dict[str, Any]) -> None:
        """Install one feed of the answer to `query`: a delta applies to the feed we hold."""
        pv, rv, _ = self.versions
        try:
            feed = _whole(Feed.parse(doc), query, self._feed)
        except DeltaMismatch:
            raise  # the whole list is asked for (`_poll_feed`)
        except WireError as exc:
            raise ControlPlaneError(
                f"bad feed: {exc.message}", reason=Reason.AUTHORITY_PROTOCOL
            ) from None
        changed = (feed.policy_version, feed.revocation_version) != (pv, rv)
        new_bundle = self._apply_bundle(feed)
        if changed:
            self._apply_policy(feed)
            self._feed = feed
        else:
            self.versions = (pv, rv, feed.bundle_sequence)
        # Both are in force already; saving them never waits on the disk.
        if new_bundle:
            self.state.request(BUNDLE, self._write_bundle)
        if changed:
            self.state.request(FEED, self._write_feed)
        self._note(DUTY_WATCH, None)  # a stream may bring the next one 25 s from now

    def _watch_query(self) -> WatchQuery:
        """The next watch: deltas once the feed we hold is the version we enforce."""
        held = self._feed
        delta = held is not None and held.policy_version == self.versions[0]
        return WatchQuery(*self.versions, wait=WATCH_WAIT, delta=delta, stream=True)

    async def watch(self) -> None:
        """Follow the allow-list, revocations and bundle; never returns."""
        failures = 0
        while True:
            try:
                if self._holds_revoked_svid():
                    await self._enroll_again()
                    self.versions, self._feed = (-1, -1, -1), None  # the whole feed, at once
                    self.host.lifecycle.problem(SVID_PROBLEM, None)
                await self._poll_feed(self._watch_query(), WATCH_WAIT + 10)
                failures = 0
                self._note(DUTY_WATCH, None)
            except Exception as exc:  # one failed poll, never the end of the watcher
                failures += 1
                err = as_meshid(exc)
                reason, detail = err.reason, err.message
                slow = permanent(exc) or self._holds_revoked_svid()
                if slow:
                    delay = self.pacing.slow(self.rand())
                else:
                    delay = self.pacing.watch_retry(failures, self.rand())
                self._note(DUTY_WATCH, exc)
                self.host.events.emit(
                    "watch_failed",
                    reason=reason,
                    detail=detail,
                    retry_in_s=round(delay, 1),
                    permanent=slow or None,
                )
                if isinstance(exc, ControlPlaneError):
                    self._refused_as_revoked(exc)
                await trio.sleep(delay)

    def _refused_as_revoked(self, exc: ControlPlaneError) -> None:
        """Take in the authority refusing us as revoked, if it did: the identity or our SVID."""
        if exc.reason != IDENTITY_REVOKED:
            return
        if exc.revoked_serial is None:
            self._revoked_self(exc.revocation_version)
            return
        svid = self.current.svid()
        if svid is None or svid.serial != exc.revoked_serial or self._holds_revoked_svid():
            return  # an SVID we no longer hold (renewed meanwhile), or said already
        self._revoked_svid = svid.serial
        self._cut_off(exc.revocation_version)
        me = self.current.identity
        if self.source.jwt_file is not None:
            fix = f"it enrolls again with the platform's token in {self.source.jwt_file}"
        else:
            fix = (
                f"to bring it back, create a join token with 'meshid ca token {me}' and write "
                f"it to {self.source.token_file or 'the file authority.token_file names'}: the "
                "sidecar enrolls with it at its next attempt, no restart needed"
            )
        self.host.lifecycle.problem(
            SVID_PROBLEM, f"svid {svid.serial:x} revoked, waiting to enroll again"
        )
        self.host.events.emit(
            "svid_revoked",
            reason=Reason.IDENTITY_REVOKED,
            serial=f"{svid.serial:x}",
            detail=(
                f"the authority revoked this sidecar's SVID {svid.serial:x} ({me} itself is not "
                "revoked): this sidecar closed its connections and refuses new ones, as every "
                f"peer refuses that SVID; {fix}"
            ),
        )

    def _holds_revoked_svid(self) -> bool:
        svid = self.current.svid()
        return svid is not None and svid.serial == self._revoked_svid

    def _cut_off(self, revocation_version: int | None) -> None:
        """Refuse every connection, as for a revoked identity (see `_revoked_self`)."""
        me = self.current.identity
        policy = self.current.policy
        version = policy.revocation_version
        if revocation_version is not None:
            version = max(version, revocation_version)
        self.host.install_policy(
            Policy.build(policy.pairs, policy.version, {*policy.revoked, me}, version)
        )

    def _revoked_self(self, revocation_version: int | None = None) -> None:
        """The authority revoked this very workload: stop using the identity, say so once.

        The revocation version is the one the authority's refusal names (the
        feed that would carry it is refused to us), so decisions here cite the
        same version as everywhere else.
        """
        me = self.current.identity
        if me in self.current.policy.revoked:
            return
        self._cut_off(revocation_version)
        self.host.events.emit(
            "identity_revoked",
            reason=Reason.IDENTITY_REVOKED,
            detail=(
                f"the authority revoked {me}: this sidecar closed its connections and refuses "
                "new ones, as every peer does; to bring the workload back, enroll it under a "
                "new identity (meshid ca token NEW-ID) and change `identity` in this config"
            ),
        )
