"""The messages between authority and sidecar: round trips, hostile input, older shapes.

Pure: no sockets. Each parse must turn anything a peer can send into the
message or a `WireError` naming the field, never another exception.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshid.feedwire import DeltaMismatch, Feed, PolicyDelta
from meshid.spiffeid import SpiffeId
from meshid.wire import (
    WIRE_VERSION,
    EnrollRequest,
    ErrorBody,
    RenewRequest,
    ReportAck,
    SvidReply,
    WatchQuery,
    WireError,
    decode,
)

WEB = SpiffeId.parse("spiffe://example.org/web")
API = SpiffeId.parse("spiffe://example.org/api")
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

MESSAGES: list[Any] = [
    EnrollRequest(token="tok-123", csr=PEM),
    RenewRequest(csr=PEM),
    RenewRequest(csr=PEM, bundle_sequence=7),
    SvidReply(WEB, PEM, "1f", "2030-01-01T00:00:00+00:00", 3, PEM),
    SvidReply(WEB, PEM, "1f", "2030-01-01T00:00:00+00:00", 3),
    Feed(4, 2, 3, ((WEB, API),), (API,), PEM),
    Feed(0, 0, 1, (), (), PEM),
    Feed(5, 2, 3, (), (), PEM, delta=PolicyDelta(4, ((WEB, API),), ((API, WEB),))),
    Feed(
        5,
        2,
        3,
        (),
        (),
        PEM,
        delta=PolicyDelta(3, prefix_added=((str(WEB), "spiffe://example.org/ns/*"),)),
    ),
    ReportAck(),
]
PARSERS = [
    EnrollRequest.parse,
    RenewRequest.parse,
    SvidReply.parse,
    Feed.parse,
    ReportAck.parse,
    ErrorBody.parse,
]

KEYS = [
    *("v", "token", "csr", "svid", "serial", "spiffe_id", "not_after", "bundle"),
    *("bundle_sequence", "policy_version", "revocation_version", "pairs"),
    *("revoked", "recorded", "error", "message", "x"),
]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from([PEM, str(WEB), "spiffe://x/y", "-1"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(KEYS),
            inner,
            max_size=8,
        )
    ),
    max_leaves=16,
)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Any) -> None:
    doc = message.to_json()
    assert doc["v"] == WIRE_VERSION
    wire = json.dumps(doc).encode()
    assert type(message).parse(decode(wire, "message")) == message


def test_the_error_body_round_trips_and_carries_no_version() -> None:
    body = ErrorBody("token_used", "the join token was used already")
    assert body.to_json() == {"error": "token_used", "message": "the join token was used already"}
    assert ErrorBody.parse(body.to_json()) == body


def test_an_odd_error_body_still_says_something_printable() -> None:
    assert ErrorBody.parse([1]) == ErrorBody("authority_refused", "")
    odd = ErrorBody.parse({"error": "x" * 100, "message": "a\nb\x1b[2J"})
    assert odd.error == "x" * 64 and odd.message == "a?b?[2J"


@pytest.mark.parametrize(
    "query",
    [
        WatchQuery(),
        WatchQuery(4, 2, 3, 25.0),
        WatchQuery(0, 0, 1, 0.0),
        WatchQuery(4, 2, 3, 25.0, delta=True),
    ],
)
def test_the_watch_query_round_trips(query: WatchQuery) -> None:
    from urllib.parse import parse_qsl, urlsplit

    target = urlsplit(query.target())
    assert target.path == "/v1/watch"
    assert WatchQuery.parse(dict(parse_qsl(target.query))) == query


def test_a_malformed_watch_version_is_refused_naming_it() -> None:
    with pytest.raises(WireError) as info:
        WatchQuery.parse({"policy_version": "1e3"})
    assert info.value.reason == "invalid_query"
    assert "policy_version" in info.value.message


def test_a_watch_query_without_a_version_is_version_1_and_an_older_one_is_refused() -> None:
    assert WatchQuery.parse({"policy_version": "3"}) == WatchQuery(policy_version=3)
    with pytest.raises(WireError, match="upgrade the sidecar") as info:
        WatchQuery.parse({"v": "0"})
    assert info.value.reason == "invalid_query"


def test_an_unusable_wait_reads_as_the_default() -> None:
    for wait in ("nan", "inf", "-1", "soon", "", "0x10"):
        assert WatchQuery.parse({"wait": wait}).wait is None
    assert WatchQuery.parse({"wait": "1e9"}).wait == 3600.0


@settings(max_examples=300, deadline=None)
@given(doc=JSON, which=st.sampled_from(PARSERS))
def test_any_json_parses_or_is_a_clean_wire_error(doc: object, which: Any) -> None:
    try:
        which(doc)
    except WireError as exc:
        assert exc.reason == "invalid_json"
        assert "\n" not in exc.message


@settings(max_examples=200, deadline=None)
@given(
    query=st.dictionaries(
        st.sampled_from(
            ["v", "wait", "policy_version", "revocation_version", "bundle_sequence", "x"]
        ),
        st.text(max_size=25),
        max_size=6,
    )
)
def test_any_watch_query_parses_or_is_a_clean_wire_error(query: dict[str, str]) -> None:
    try:
        WatchQuery.parse(query)
    except WireError as exc:
        assert exc.reason == "invalid_query"


@given(body=st.binary(max_size=200))
def test_any_bytes_decode_or_are_a_clean_wire_error(body: bytes) -> None:
    try:
        decode(body, "body")
    except WireError as exc:
        assert exc.reason == "invalid_json"


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_message_from_before_versioning_reads_as_version_1(message: Any) -> None:
    doc = message.to_json()
    del doc["v"]
    assert type(message).parse(doc) == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_a_newer_message_with_fields_we_do_not_know_is_read(message: Any) -> None:
    doc = {**message.to_json(), "v": WIRE_VERSION + 1, "something_new": {"a": [1]}}
    assert type(message).parse(doc) == message


def test_a_reply_missing_a_field_says_to_upgrade_the_authority() -> None:
    doc = SvidReply(WEB, PEM, "1f", "2030-01-01T00:00:00+00:00", 3).to_json()
    del doc["svid"]
    with pytest.raises(WireError, match=r"svid: missing \(upgrade the authority\)"):
        SvidReply.parse(doc)
    feed = Feed(0, 0, 1, (), (), PEM).to_json()
    del feed["revocation_version"]
    with pytest.raises(WireError, match=r"revocation_version: missing \(upgrade the authority\)"):
        Feed.parse(feed)


def test_a_request_missing_a_field_says_to_upgrade_the_sidecar() -> None:
    with pytest.raises(WireError, match=r"csr: missing \(upgrade the sidecar\)"):
        EnrollRequest.parse({"v": 1, "token": "t"})


def test_a_version_below_the_oldest_read_is_refused_whole() -> None:
    with pytest.raises(WireError, match=r"wire version 0.*upgrade the sidecar"):
        EnrollRequest.parse({"v": 0, "token": "t", "csr": PEM})
    with pytest.raises(WireError, match="v: must be an integer"):
        Feed.parse({"v": "1"})


def test_a_feed_with_a_bad_identity_names_the_entry() -> None:
    doc = Feed(0, 0, 1, ((WEB, API),), (), PEM).to_json()
    doc["pairs"][0][1] = "https://example.org/api"
    with pytest.raises(WireError, match=r"pairs\[0\]\[1\]: must be a SPIFFE ID"):
        Feed.parse(doc)


def test_an_enrollment_by_jwt_carries_an_empty_token_for_older_authorities() -> None:
    request = EnrollRequest(csr="PEM", jwt="a.b.c")
    doc = request.to_json()
    assert doc["token"] == "" and doc["jwt"] == "a.b.c"
    assert EnrollRequest.parse(doc) == request
    with pytest.raises(WireError, match="token"):  # an empty token without a jwt is refused
        EnrollRequest.parse({"v": 1, "token": "", "csr": "PEM"})
    with pytest.raises(WireError, match="jwt"):
        EnrollRequest.parse({"v": 1, "token": "", "csr": "PEM", "jwt": 5})


def test_a_delta_applies_only_to_the_version_it_was_cut_from() -> None:
    held = Feed(4, 1, 3, ((WEB, API), (API, WEB)), (), PEM, prefix_rules=((str(API), "x/*"),))
    other = SpiffeId.parse("spiffe://example.org/other")
    delta = Feed(5, 2, 3, (), (API,), PEM, delta=PolicyDelta(4, ((WEB, other),), ((API, WEB),)))
    full = delta.applied_to(held)
    assert full.delta is None
    assert set(full.pairs) == {(WEB, API), (WEB, other)}
    assert full.prefix_rules == held.prefix_rules
    assert (full.policy_version, full.revocation_version, full.revoked) == (5, 2, (API,))
    with pytest.raises(DeltaMismatch, match="cut from policy version 4, this sidecar holds 5"):
        delta.applied_to(full)
    # A full feed applies to anything: it is what it is.
    assert full.applied_to(held) is full


def test_a_watch_query_asks_for_deltas_only_when_told() -> None:
    assert "delta" not in WatchQuery(1, 1, 1).to_query()
    assert WatchQuery.parse({"delta": "1"}).delta
    assert not WatchQuery.parse({"delta": "yes"}).delta


def test_an_old_reader_of_a_full_feed_never_sees_a_delta_field() -> None:
    assert "delta" not in Feed(0, 0, 1, ((WEB, API),), (), PEM).to_json()


def test_a_malformed_delta_names_the_field() -> None:
    doc = Feed(5, 0, 1, (), (), PEM, delta=PolicyDelta(4, ((WEB, API),))).to_json()
    doc["delta"]["pairs_added"][0] = ["spiffe://example.org/web"]
    with pytest.raises(
        WireError, match=r"delta.pairs_added\[0\]: must be a \[source, target\] pair"
    ):
        Feed.parse(doc)
    doc["delta"] = {"base_version": -1}
    with pytest.raises(WireError, match=r"delta.base_version"):
        Feed.parse(doc)
