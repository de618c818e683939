"""The control plane speaks `meshid.wire`: versioned replies, older requests still read.

Through `ControlApi.handle` with a real authority, as the TLS shell calls it.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest
from ca_helpers import TD, Clock
from cryptography import x509

from ca.api import ControlApi, Reply, Request
from ca.authority import Authority
from meshid.feedwire import Feed
from meshid.ratelimit import FailureLimiter
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key
from meshid.wire import WIRE_VERSION, SvidReply, WatchQuery
from sidecar.dynamic import build_csr

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


def _api(authority: Authority, clock: Clock) -> ControlApi:
    return ControlApi(authority, clock, time.monotonic, FailureLimiter())


def _enroll(authority: Authority, clock: Clock, doc: dict[str, object]) -> Reply:
    body = json.dumps(doc).encode()
    return _api(authority, clock).handle(Request("POST", "/v1/enroll", {}, body, "127.0.0.1"))


def test_an_enrollment_without_a_version_is_read_as_version_1(
    authority: Authority, clock: Clock
) -> None:
    token = authority.create_token(WEB)
    csr = build_csr(generate_key(), WEB).decode()
    reply = _enroll(authority, clock, {"token": token, "csr": csr})
    assert reply.status == 200, reply.body
    assert reply.body["v"] == WIRE_VERSION
    assert SvidReply.parse(reply.body).spiffe_id == WEB


def test_an_enrollment_from_a_newer_sidecar_with_unknown_fields_is_read(
    authority: Authority, clock: Clock
) -> None:
    token = authority.create_token(WEB)
    csr = build_csr(generate_key(), WEB).decode()
    doc = {"v": WIRE_VERSION + 1, "token": token, "csr": csr, "attestation": {"kind": "x"}}
    assert _enroll(authority, clock, doc).status == 200


def test_an_enrollment_missing_a_field_is_refused_naming_it(
    authority: Authority, clock: Clock
) -> None:
    reply = _enroll(authority, clock, {"v": WIRE_VERSION, "token": "t"})
    assert (reply.status, reply.body["error"]) == (400, "invalid_json")
    assert reply.body["message"] == "csr: missing (upgrade the sidecar)"


def _cert(authority: Authority, sid: SpiffeId) -> x509.Certificate:
    return authority.issue(sid, generate_key().public_key()).leaf


def test_the_feed_is_a_versioned_wire_feed(authority: Authority, clock: Clock) -> None:
    authority.allow(WEB, API)
    query = dict(q.split("=") for q in WatchQuery().to_query().split("&"))
    req = Request("GET", "/v1/watch", query, b"", "127.0.0.1", _cert(authority, WEB))
    reply = _api(authority, clock).handle(req)
    assert reply.status == 200 and reply.body["v"] == WIRE_VERSION
    assert Feed.parse(reply.body).pairs == ((WEB, API),)


def test_a_malformed_watch_version_is_refused_naming_it(authority: Authority, clock: Clock) -> None:
    req = Request(
        "GET", "/v1/watch", {"policy_version": "x"}, b"", "1.2.3.4", _cert(authority, WEB)
    )
    reply, _ = _api(authority, clock).watch_check(req)
    assert reply is not None
    assert (reply.status, reply.body["error"]) == (400, "invalid_query")
    assert "policy_version" in reply.body["message"]


def _watch(authority: Authority, clock: Clock, sid: SpiffeId) -> Reply:
    query = dict(q.split("=") for q in WatchQuery().to_query().split("&"))
    req = Request("GET", "/v1/watch", query, b"", "127.0.0.1", _cert(authority, sid))
    return _api(authority, clock).handle(req)


def test_a_caller_is_checked_without_reading_the_whole_allow_list(
    authority: Authority, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every authenticated request asks whether its caller is revoked: one lookup, not the
    whole allow-list, which a mesh of ten thousand sidecars made cost a second a request."""
    authority.allow(WEB, API)

    def whole_policy() -> None:
        raise AssertionError("the whole allow-list was read to authenticate a caller")

    monkeypatch.setattr(authority, "policy", whole_policy)
    reply = _watch(authority, clock, WEB)
    assert reply.status == 200, reply.body
    assert Feed.parse(reply.body).pairs == ((WEB, API),)


def test_a_revoked_caller_is_refused_with_the_revocation_version(
    authority: Authority, clock: Clock
) -> None:
    cert = _cert(authority, WEB)
    authority.revoke(SpiffeId(TD, "/other"))
    version = authority.revoke(WEB)
    query = dict(q.split("=") for q in WatchQuery().to_query().split("&"))
    reply = _api(authority, clock).handle(
        Request("GET", "/v1/watch", query, b"", "127.0.0.1", cert)
    )
    assert (reply.status, reply.body["error"]) == (403, "identity_revoked")
    assert reply.body["revocation_version"] == version
    assert _watch(authority, clock, API).status == 200  # its twin, not revoked


def test_a_callers_chain_is_verified_once_and_its_expiry_every_time(
    authority: Authority, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every watch checks its caller; a mesh asks thousands of times a minute with the same
    certificates, so the signature check is remembered, while the time check is not."""
    import ca.issuance

    calls: list[object] = []
    real = ca.issuance.verify_svid

    def counted(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(ca.issuance, "verify_svid", counted)
    cert = _cert(authority, WEB)
    query = dict(q.split("=") for q in WatchQuery().to_query().split("&"))
    api = _api(authority, clock)
    for _ in range(3):
        assert api.handle(Request("GET", "/v1/watch", query, b"", "127.0.0.1", cert)).status == 200
    assert len(calls) == 1
    clock.advance(cert.not_valid_after_utc - clock() + timedelta(seconds=1))
    reply = api.handle(Request("GET", "/v1/watch", query, b"", "127.0.0.1", cert))
    assert reply.status == 401 and reply.body["error"] == "expired", reply.body


def test_watches_checked_together_read_the_versions_once(
    authority: Authority, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of watch checks reads the versions once (a read transaction and three
    queries), not once per watch; each watch is still judged on its own."""
    api = _api(authority, clock)
    current = authority.versions()
    up_to_date = dict(q.split("=") for q in WatchQuery(*current).to_query().split("&"))
    behind = dict(q.split("=") for q in WatchQuery().to_query().split("&"))
    reqs = [
        Request("GET", "/v1/watch", up_to_date, b"", "127.0.0.1", _cert(authority, WEB)),
        Request("GET", "/v1/watch", behind, b"", "127.0.0.1", _cert(authority, API)),
        Request(
            "GET", "/v1/watch", {"policy_version": "x"}, b"", "127.0.0.1", _cert(authority, WEB)
        ),
    ]
    reads = 0
    versions = authority.versions

    def counted() -> tuple[int, int, int]:
        nonlocal reads
        reads += 1
        return versions()

    monkeypatch.setattr(authority, "versions", counted)
    checked = api.watch_check_each(reqs)
    assert reads == 1
    assert checked[0] == (None, current)
    reply, seen = checked[1]
    assert reply is not None and reply.status == 200 and seen == current
    reply, _ = checked[2]
    assert reply is not None and reply.body["error"] == "invalid_query"


def test_a_batch_of_feeds_and_checks_is_read_in_one_transaction(
    authority: Authority, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every feed and every check reads several things (the caller's revocation, the
    versions, the pairs); a batch reads them all in one snapshot, not a transaction each."""
    api = _api(authority, clock)
    authority.allow(WEB, API)
    behind = dict(q.split("=") for q in WatchQuery().to_query().split("&"))
    reqs = [
        Request("GET", "/v1/watch", behind, b"", "127.0.0.1", _cert(authority, sid))
        for sid in (WEB, API, WEB)
    ]
    engine = authority.store._engine
    begun = 0
    begin_read = engine.begin_read

    def counted() -> None:
        nonlocal begun
        begun += 1
        begin_read()

    monkeypatch.setattr(engine, "begin_read", counted)
    feeds = api.handle_each(reqs)
    assert begun == 1
    assert [Feed.parse(f.body).pairs for f in feeds] == [((WEB, API),)] * 3
    checked = api.watch_check_each(reqs)
    assert begun == 2
    assert all(reply is not None and reply.status == 200 for reply, _ in checked)
