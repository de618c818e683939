"""A change wakes every sidecar at once: what their feeds share is made once per version.

The feed's shared part (bundle, revocations, addresses, federated bundles) is
the same for every sidecar at one version; it is encoded once and spliced
into each reply, whose bytes stay those `json.dumps` would write. The caller
found not revoked when its feed was read is not looked up again when it parks
its next watch at that same revocation version.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from ca_helpers import TD, Clock
from cryptography import x509

import ca.feedindex
from ca.api import ControlApi, Reply, Request
from ca.authority import Authority
from meshid.bundle import TrustBundle
from meshid.feedwire import Feed
from meshid.ratelimit import FailureLimiter
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key
from meshid.wire import WatchQuery

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")
DB = SpiffeId(TD, "/db")


def _api(authority: Authority, clock: Clock) -> ControlApi:
    return ControlApi(authority, clock, time.monotonic, FailureLimiter())


def _cert(authority: Authority, sid: SpiffeId) -> x509.Certificate:
    return authority.issue(sid, generate_key().public_key()).leaf


def _watch(cert: x509.Certificate, query: WatchQuery) -> Request:
    params = dict(q.split("=") for q in query.to_query().split("&"))
    return Request("GET", "/v1/watch", params, b"", "127.0.0.1", cert)


def _at(feed: Feed, *, delta: bool = False) -> WatchQuery:
    """The query of a sidecar holding `feed`."""
    held = (feed.policy_version, feed.revocation_version, feed.bundle_sequence)
    return WatchQuery(*held, delta=delta)


def _compact(reply: Reply) -> bytes:
    return json.dumps(reply.body, separators=(",", ":")).encode() + b"\n"


def test_a_spliced_feed_is_the_bytes_json_would_write(authority: Authority, clock: Clock) -> None:
    authority.allow(WEB, API)
    authority.allow("spiffe://example.org/ns/*", WEB)
    authority.revoke(SpiffeId(TD, "/gone"))
    api = _api(authority, clock)
    web, api_cert = _cert(authority, WEB), _cert(authority, API)
    whole = api.handle(_watch(web, WatchQuery()))
    assert whole.status == 200, whole.body
    assert whole.encode() == _compact(whole)
    feed = Feed.parse(json.loads(whole.encode()))
    assert feed.pairs == ((WEB, API),) and feed.prefix_rules
    assert feed.revoked == (SpiffeId(TD, "/gone"),)
    held = Feed.parse(api.handle(_watch(api_cert, WatchQuery())).body)
    authority.allow(API, DB)
    delta = api.handle(_watch(api_cert, _at(held, delta=True)))
    assert delta.encode() == _compact(delta)
    parsed = Feed.parse(json.loads(delta.encode()))
    assert parsed.delta is not None and parsed.delta.pairs_added == ((API, DB),)


def test_an_error_reply_is_encoded_whole(authority: Authority, clock: Clock) -> None:
    """Only a feed is spliced: a refusal (a revoked caller) is written from its body."""
    cert = _cert(authority, WEB)
    authority.revoke(WEB)
    reply = _api(authority, clock).handle(_watch(cert, WatchQuery()))
    assert reply.status == 403 and reply.encode() == _compact(reply)


def test_the_shared_part_is_encoded_once_per_version(
    authority: Authority, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority.allow(WEB, API)
    encoded: list[object] = []
    real = ca.feedindex.encode_members

    def counted(doc: dict[str, Any]) -> bytes:
        if "bundle" in doc:
            encoded.append(doc)
        return real(doc)

    monkeypatch.setattr(ca.feedindex, "encode_members", counted)
    api = _api(authority, clock)
    reqs = [_watch(_cert(authority, sid), WatchQuery()) for sid in (WEB, API, DB, WEB)]
    replies = api.handle_each(reqs)
    assert [r.status for r in replies] == [200] * 4
    assert [Feed.parse(json.loads(r.encode())).pairs for r in replies[:2]] == [((WEB, API),)] * 2
    assert len(encoded) == 1
    authority.deny(WEB, API)  # a new version: its shared part encoded once more
    assert all(r.status == 200 for r in api.handle_each(reqs))
    assert len(encoded) == 2


def test_the_bundle_pem_is_made_once_per_bundle_sequence(
    authority: Authority, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each policy change reads a new index; its bundle PEM is the last one while the
    bundle's sequence stands."""
    made: list[int] = []
    real = TrustBundle.to_pem

    def counted(bundle: TrustBundle) -> bytes:
        made.append(bundle.sequence)
        return real(bundle)

    monkeypatch.setattr(TrustBundle, "to_pem", counted)
    api = _api(authority, clock)
    cert = _cert(authority, WEB)
    made.clear()  # issuing may have made one
    for peer in (API, DB, SpiffeId(TD, "/cache")):
        authority.allow(WEB, peer)  # a new policy version each: a new index each
        reply = api.handle(_watch(cert, WatchQuery()))
        assert reply.status == 200 and (WEB, peer) in Feed.parse(reply.body).pairs
    assert len(made) == 1


def _revocation_lookups(
    authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[SpiffeId, int | None]]:
    calls: list[tuple[SpiffeId, int | None]] = []
    real = authority.revocation

    def counted(sid: SpiffeId, serial: int | None = None) -> int | None:
        calls.append((sid, serial))
        return real(sid, serial)

    monkeypatch.setattr(authority, "revocation", counted)
    return calls


def test_a_watch_parked_after_its_feed_is_not_looked_up_again(
    authority: Authority, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feed then park, at one revocation version: the caller's revocation is read once."""
    api = _api(authority, clock)
    cert = _cert(authority, WEB)
    lookups = _revocation_lookups(authority, monkeypatch)
    [feed] = api.handle_each([_watch(cert, WatchQuery())])
    assert feed.status == 200
    held = Feed.parse(feed.body)
    [(reply, seen)] = api.watch_check_each([_watch(cert, _at(held))])
    assert reply is None and seen == _at(held).versions
    assert len(lookups) == 1


def test_a_caller_revoked_after_its_feed_is_refused_when_it_parks(
    authority: Authority, clock: Clock
) -> None:
    """The negative twin: a revocation moves the version, so the caller is looked up again."""
    api = _api(authority, clock)
    web, api_cert = _cert(authority, WEB), _cert(authority, API)
    feeds = api.handle_each([_watch(web, WatchQuery()), _watch(api_cert, WatchQuery())])
    held = [Feed.parse(f.body) for f in feeds]
    version = authority.revoke(WEB)
    checked = api.watch_check_each([_watch(web, _at(held[0]))])
    [(reply, _)] = checked
    assert reply is not None and (reply.status, reply.body["error"]) == (403, "identity_revoked")
    assert reply.body["revocation_version"] == version
    # a caller claiming the versions of now, never having read a feed, is looked up too
    now = authority.versions()
    [(reply, _)] = api.watch_check_each([_watch(web, WatchQuery(*now))])
    assert reply is not None and reply.status == 403
    [(reply, _)] = api.watch_check_each([_watch(api_cert, _at(held[1]))])
    assert reply is not None and reply.status == 200  # its twin: behind, gets its feed


def test_a_revoked_serial_is_refused_when_it_parks_at_the_same_versions(
    authority: Authority, clock: Clock
) -> None:
    api = _api(authority, clock)
    cert = _cert(authority, WEB)
    [feed] = api.handle_each([_watch(cert, WatchQuery())])
    authority.revoke_serial(f"{cert.serial_number:x}")
    now = authority.versions()
    [(reply, _)] = api.watch_check_each([_watch(cert, WatchQuery(*now))])
    assert feed.status == 200
    assert reply is not None and reply.status == 403 and "revoked_serial" in reply.body


def test_the_changes_since_a_version_are_read_once_for_the_sidecars_holding_it(
    authority: Authority, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change wakes every sidecar holding the previous version: the history after it is
    read once, and each still gets only the changes that concern it."""
    import ca.access

    authority.allow(WEB, API)
    api = _api(authority, clock)
    certs = {sid: _cert(authority, sid) for sid in (WEB, API, DB)}
    held = {sid: Feed.parse(api.handle(_watch(c, WatchQuery())).body) for sid, c in certs.items()}
    reads: list[tuple[int, int]] = []
    real = ca.access.changes_between

    def counted(conn: Any, since: int, upto: int) -> Any:
        reads.append((since, upto))
        return real(conn, since, upto)

    monkeypatch.setattr(ca.access, "changes_between", counted)
    authority.allow(API, DB)
    reqs = [_watch(c, _at(held[sid], delta=True)) for sid, c in certs.items()]
    replies = api.handle_each(reqs)
    assert len(reads) == 1
    feeds = {sid: Feed.parse(r.body) for sid, r in zip(certs, replies, strict=True)}
    assert feeds[WEB].delta is not None and feeds[WEB].delta.size == 0
    assert feeds[API].delta is not None and feeds[API].delta.pairs_added == ((API, DB),)
    for sid, feed in feeds.items():
        assert feed.applied_to(held[sid]) == Feed.parse(authority.feed(sid))
    # the negative twin: a version the history no longer covers gets the whole list
    monkeypatch.setattr(ca.access, "FLOOR", "policy_version")  # as if trimmed up to now
    authority.deny(WEB, API)
    [whole] = api.handle_each(
        [_watch(certs[WEB], _at(feeds[WEB].applied_to(held[WEB]), delta=True))]
    )
    assert Feed.parse(whole.body).delta is None and Feed.parse(whole.body).pairs == ()
