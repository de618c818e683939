"""The control plane speaks `meshid.wire`: versioned replies, older requests still read.

Through `ControlApi.handle` with a real authority, as the TLS shell calls it.
"""

from __future__ import annotations

import json
import time

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
